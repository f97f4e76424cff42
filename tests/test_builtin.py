"""The built-in corpus: the Python standard library's sources and licence, its tests left out."""

from pjit_llm.data import builtin


def test_builtin_corpus_is_the_standard_library_without_its_tests():
    files = builtin.files()
    names = [n for n, _ in files]
    assert any(n.endswith("pydoc_data/topics.py") for n in names)
    assert not any("/test/" in f"/{n}" for n in names)
    assert all(path.is_file() for _, path in files[:50])
