"""Everything model-family specific lives here: where the decoder layers, the prunable linears, the embedding and
the lm_head are, and whether the head is tied. Other modules ask this module and never test family names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from converter.errors import ModelError


@dataclass(frozen=True)
class FamilySpec:
    """Attribute paths of a decoder-only family whose modelling code follows the Llama layout."""

    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    head_path: str = "lm_head"
    onnx_task: str = "text-generation-with-past"


_LLAMA_LIKE = FamilySpec(
    model_types=(
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "granite",
        "olmo2",
        "smollm3",
    )
)

FAMILIES: dict[str, FamilySpec] = {t: _LLAMA_LIKE for t in _LLAMA_LIKE.model_types}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def spec_for(model_type: str) -> FamilySpec:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ModelError(
            f"model_type '{model_type}' is not supported; use a model of one of these families: "
            f"{', '.join(supported_model_types())}."
        ) from None


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Arch:
    """Accessors bound to one loaded model."""

    model: nn.Module
    spec: FamilySpec

    @classmethod
    def of(cls, model: nn.Module) -> Arch:
        return cls(model=model, spec=spec_for(model.config.model_type))

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    def decoder_layers(self) -> nn.ModuleList:
        return _get(self.model, self.spec.layers_path)

    def prunable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Every nn.Linear inside one decoder layer, by qualified name (q_proj, ..., down_proj)."""
        return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}

    def input_embeddings(self) -> nn.Embedding:
        return _get(self.model, self.spec.embed_path)

    def lm_head(self) -> nn.Linear:
        return _get(self.model, self.spec.head_path)

    def is_tied(self) -> bool:
        return self.lm_head().weight.data_ptr() == self.input_embeddings().weight.data_ptr()
