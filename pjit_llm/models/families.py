"""The model families, in one table: `model.family` picks one, and everything outside
models/ reaches a family only through the functions here. A new family is a package under
models/ that builds a `Family` record (models/family.py) and one line in `FAMILIES`."""

from flax import nnx

from pjit_llm.errors import UserError
from pjit_llm.models import gemma3, llama, mixtral, qwen3, qwen3_moe
from pjit_llm.models.decoder import Transformer
from pjit_llm.models.decoder_config import DecoderConfig
from pjit_llm.models.family import Family
from pjit_llm.parallel.layout import Layout
from pjit_llm.parallel.stages import Pipeline

FAMILIES: dict[str, Family] = {f.name: f for f in (
    llama.FAMILY,
    qwen3.FAMILY,
    gemma3.FAMILY,
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"model.family={name!r} is not one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(cfg: DecoderConfig) -> Family:
    return family(cfg.family)


def config_class(section: dict) -> type[DecoderConfig]:
    """The `model` section's class for its raw mapping (its `family` key, llama if absent)."""
    name = section.get("family", "llama") if isinstance(section, dict) else "llama"
    return family(str(name)).config


def make_model(cfg: DecoderConfig, layout: Layout | None, rngs: nnx.Rngs,
               pipeline: Pipeline | None = None, layer_list: bool = False) -> Transformer:
    return family_of(cfg).model(cfg, layout, rngs, pipeline, layer_list)


def abstract_model(cfg: DecoderConfig, layout: Layout | None, pipeline: Pipeline | None = None,
                   layer_list: bool = False) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and parameter shapes (with logical axes), without allocating."""
    model = nnx.eval_shape(lambda: make_model(cfg, layout, nnx.Rngs(0), pipeline, layer_list))
    return nnx.split(model)


def hf_family(hf: dict, source: str) -> Family:
    """The family that reads this config.json: by its `model_type`, else its architectures;
    refused in one line naming the model types we read."""
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    for f in FAMILIES.values():
        if model_type in f.hf_architectures.values() if model_type else (
                len(architectures) == 1 and architectures[0] in f.hf_architectures):
            return f
    known = sorted({mt for f in FAMILIES.values() for mt in f.hf_architectures.values()})
    given = (f"model_type {model_type}" if model_type else
             f"architecture {', '.join(map(str, architectures)) or '(none given)'}")
    raise UserError(f"{source}: {given} is not supported; the model types read are: "
                    f"{', '.join(known)}")
