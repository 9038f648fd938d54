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
    # FFN projections inside one decoder layer (gate is None for a plain MLP) and the config key of their width
    ffn_gate: str | None = "mlp.gate_proj"
    ffn_up: str = "mlp.up_proj"
    ffn_down: str = "mlp.down_proj"
    ffn_width_key: str = "intermediate_size"
    # Hugging Face architecture classes that onnxruntime-genai's model builder (0.13) converts.
    genai_architectures: tuple[str, ...] = ()


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
    ),
    genai_architectures=(
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "GraniteForCausalLM",
        "SmolLM3ForCausalLM",
    ),
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

    def ffn(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
        """(gate, up, down) of one decoder layer's FFN; gate is None for a plain MLP."""
        gate = _get(layer, self.spec.ffn_gate) if self.spec.ffn_gate else None
        return gate, _get(layer, self.spec.ffn_up), _get(layer, self.spec.ffn_down)

    def replace_ffn(self, layer: nn.Module, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear) -> None:
        for path, mod in ((self.spec.ffn_gate, gate), (self.spec.ffn_up, up), (self.spec.ffn_down, down)):
            if path is None:
                continue
            parent, _, name = path.rpartition(".")
            setattr(_get(layer, parent) if parent else layer, name, mod)

    def set_ffn_width(self, width: int) -> None:
        setattr(self.model.config, self.spec.ffn_width_key, int(width))

    def ffn_width(self) -> int:
        return int(getattr(self.model.config, self.spec.ffn_width_key))

    def input_embeddings(self) -> nn.Embedding:
        return _get(self.model, self.spec.embed_path)

    def lm_head(self) -> nn.Linear:
        return _get(self.model, self.spec.head_path)

    def is_tied(self) -> bool:
        return self.lm_head().weight.data_ptr() == self.input_embeddings().weight.data_ptr()


def causal_lm_class(model_type: str) -> str | None:
    """The class transformers' AutoModelForCausalLM builds for a model_type: the architecture a config.json
    without an ``architectures`` entry loads as, and the one langconvert then saves in ``model/config.json``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def genai_incompatibility(config: dict) -> str | None:
    """Why onnxruntime-genai's builder cannot convert a checkpoint with this config.json faithfully, or None.

    - the architecture must be one the builder knows (per family, above);
    - onnxruntime's CPU GroupQueryAttention needs head_dim to be a multiple of 16;
    - the builder assumes Gemma 3's fixed pattern of five sliding-window layers then one global layer
      (``(i + 1) % 6 != 0`` is local); a config whose ``layer_types`` differ would get the wrong attention.
    """
    arch = (config.get("architectures") or [None])[0] or causal_lm_class(config.get("model_type", ""))
    spec = FAMILIES.get(config.get("model_type", ""))
    if spec is None or arch not in spec.genai_architectures:
        return f"architecture {arch} is not one onnxruntime-genai's builder converts"
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16, which onnxruntime's CPU GroupQueryAttention needs"
    if arch == "Gemma3ForCausalLM" and config.get("layer_types"):
        expected = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(len(config["layer_types"]))]
        if list(config["layer_types"]) != expected:
            return "its layer_types differ from the five-local-one-global pattern the builder assumes for Gemma 3"
    return None
