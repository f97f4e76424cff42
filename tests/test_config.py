import dataclasses
import functools
import typing
from pathlib import Path

import pytest

from pjit_llm.config import Config, MixtureSource, Rules, _coerce, load_config
from pjit_llm.errors import UserError

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_are_the_tiny_config():
    assert load_config(str(CONFIGS / "tiny.yaml")) == load_config() == Config()


def test_every_shipped_config_loads():
    for path in CONFIGS.glob("*.yaml"):
        load_config(str(path))


def _field_types(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for name in (f.name for f in dataclasses.fields(cls)):  # not class-level traits
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            yield from _field_types(hint, f"{prefix}{name}.")
        else:
            yield prefix + name, hint


def test_every_field_type_is_read_and_no_other():
    """Each field of each shipped config reads back from its YAML form through the coercion
    of its type; a type the coercion does not know is a programming error, not strings."""
    for path in CONFIGS.glob("*.yaml"):
        cfg = load_config(str(path))
        plain = cfg.to_dict()
        for key, hint in _field_types(Config):
            section, name = key.rsplit(".", 1)
            value = getattr(functools.reduce(getattr, section.split("."), cfg), name)
            raw = functools.reduce(dict.__getitem__, key.split("."), plain)
            assert _coerce(raw, hint, key) == value, (path.name, key)
    assert {h for _, h in _field_types(Config) if typing.get_origin(h) is tuple} \
        == {tuple[int, ...], tuple[str, ...], tuple[MixtureSource, ...]}
    for hint in (tuple[float, ...], str | None):
        with pytest.raises(TypeError, match="unsupported config type"):
            _coerce(["a"], hint, "x")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  num_layers: 6\noptimizer:\n  lr: 1e-3\nmesh:\n  rules:\n    embed: null\n")
    cfg = load_config(str(path), ["model.num_layers=3", "mesh.fsdp=-1", "mesh.data=2",
                                  "mesh.rules.batch=data", "model.scan_layers=false"])
    assert cfg.model.num_layers == 3
    assert cfg.optimizer.lr == 1e-3  # YAML reads 1e-3 as a string; the float field takes it
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (2, -1)
    assert cfg.mesh.rules.embed == () and cfg.mesh.rules.batch == ("data",)
    assert cfg.model.scan_layers is False


def test_round_trip_through_dict(tmp_path):
    import yaml
    cfg = load_config(None, ["model.num_layers=3", "mesh.rules.mlp=[fsdp, tensor]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["model.num_layer=3"], "unknown config key model.num_layer; did you mean model.num_layers?"),
    (["modle.num_layers=3"], "unknown config key modle; did you mean model?"),
    (["model.num_layers=four"], "model.num_layers must be an integer, got 'four'"),
    (["model.num_layers=2.5"], "model.num_layers must be an integer"),
    (["model.tie_embeddings=1"], "model.tie_embeddings must be true or false"),
    (["model.remat=some"], "model.remat='some' is not one of: none, full, dots, proj, proj_attn, proj_offload"),
    (["model.matmul=int4"], "model.matmul='int4' is not one of: default, fp8"),
    (["model.fp8_scaling=delayed"], "model.fp8_scaling=delayed scales fp8 multiplies; set "
     "model.matmul=fp8 too, or model.fp8_scaling=current"),
    (["model.fp8_scaling=late"], "model.fp8_scaling='late' is not one of: current, delayed"),
    (["model.fp8_amax_history=0"], "model.fp8_amax_history=0 must be positive"),
    (["model.num_heads=5"], "model.num_heads=5 does not divide model.embed_dim=256"),
    (["model.num_kv_heads=3"], "model.num_kv_heads=3 must divide model.num_heads=8"),
    (["model.num_layers=0"], "model.num_layers=0 must be positive"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "only one of mesh.data, mesh.stage, mesh.fsdp, mesh.context, mesh.tensor, mesh.expert may be -1"),
    (["mesh.tensor=0"], "mesh.tensor=0 is not a size"),
    (["mesh.rules.embed=model"], "mesh.rules.embed: unknown mesh axis 'model'"),
    (["mesh.rules.rows=data"], "unknown config key mesh.rules.rows"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_len=2048"),
    (["train.grad_accum=3"], "train.grad_accum=3 must divide data.batch_size=16"),
    (["data.format=chat"], "data.format=chat reads JSONL files: set data.source=local"),
    (["data.format=chat", "data.source=local", "data.paths=[a.jsonl]"],
     "data.format=chat needs data.tokenizer=hf and data.tokenizer_path"),
    (["data.format=dialog"], "data.format='dialog' is not one of: text, chat, prompt_completion"),
    (["train.sample_temperature=-1"], "train.sample_temperature must be >= 0"),
    (["model.max_segments=-1"], "model.max_segments must be >= 0 (0: a dense mask)"),
    (["train.sample_top_p=0"], "train.sample_top_p=0.0 must lie in (0, 1]"),
    (["model"], "override 'model' is not of the form key.sub=value"),
    (["model=3"], "config section model must be a mapping"),
    (["model.num_layers.x=3"], "model.num_layers must be an integer"),
    (["model.num_layers=3", "model.num_layers.x=3"], "model.num_layers is a value, not a section"),
    (["data.mixture=[{source: builtin, weight: 0}]"],
     "data.mixture[0].weight=0.0 must be positive (a share of the tokens)"),
    (["data.mixture=[{source: builtin}, {source: local, paths: [a.txt], weight: -2}]"],
     "data.mixture[1].weight=-2.0 must be positive"),
    (["data.mixture=[{source: builtin}, {source: hf, name: x}]"],
     "data.mixture[1].source='hf' is not one of: builtin, local, tfds"),
    (["data.mixture=[{source: builtin, wieght: 2}]"],
     "unknown config key data.mixture[0].wieght; did you mean data.mixture[0].weight?"),
    (["data.mixture=[builtin]"], "config section data.mixture[0] must be a mapping"),
    (["data.mixture={source: builtin}"], "data.mixture must be a list of mappings"),
    (["data.mixture=[{source: builtin}]", "data.paths=[a.txt]"],
     "data.mixture names its own sources; remove data.paths"),
    (["data.mixture=[{source: builtin}]", "data.source=tfds", "data.name=lm1b"],
     "data.mixture names its own sources; remove data.source"),
    (["data.mixture=[{source: local}]"], "data.mixture[0].source=local needs data.mixture[0].paths"),
    (["data.mixture=[{source: tfds}]"], "data.mixture[0].source=tfds needs data.mixture[0].name"),
    (["data.mixture=[{source: local, paths: [a/x.txt]}, {source: local, paths: [b/x.txt]}]"],
     "data.mixture[1] has the label 'x' of an earlier entry; set data.mixture[1].label"),
    (["train.wandb_mode=cloud"], "train.wandb_mode='cloud' is not one of: auto, online, offline"),
])
def test_bad_values_are_refused_with_one_line(overrides, message):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(str(scalar))


def test_a_mixture_reads_from_yaml_with_labels(tmp_path):
    cfg = load_config(str(CONFIGS / "mixture.yaml"))
    assert [(m.source, m.tag, m.weight) for m in cfg.data.mixture] == [
        ("builtin", "builtin", 6.0), ("local", "docs", 3.0), ("local", "scripts", 1.0)]
    assert MixtureSource(source="tfds", name="wikitext/raw").tag == "wikitext_raw"
    assert MixtureSource(source="local", paths=("data/web.jsonl",)).tag == "web"


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_layers = 3  # type: ignore[misc]
    assert Rules().batch == ("data", "stage", "fsdp", "expert")
