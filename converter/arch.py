"""Everything model-family specific lives here: where the decoder layers, the prunable linears, the FFN, the
embedding and the lm_head are, whether the head is tied, and which export formats carry the family. Other modules
ask this module and never test family names.

Each family is one small :class:`FamilySpec` (attribute paths plus a few facts), in the spirit of
onnxruntime-genai's one builder class per family; :class:`Arch` binds a spec to a loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from converter.errors import ModelError

EXPORT_FORMATS = ("genai", "optimum")  # every export.format langconvert writes, in the recipe's order


@dataclass(frozen=True)
class FamilySpec:
    """Attribute paths of one decoder-only family: ``layers_path`` / ``embed_path`` / ``head_path`` from the
    CausalLM, the FFN projections from one decoder layer."""

    name: str  # what users read in messages
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    head_path: str = "lm_head"
    onnx_task: str = "text-generation-with-past"
    # FFN projections inside one decoder layer: gate is None for a plain (non-gated) MLP, act(up(x)) -> down
    ffn_gate: str | None = "mlp.gate_proj"
    ffn_up: str = "mlp.up_proj"
    ffn_down: str = "mlp.down_proj"
    # config key of the FFN width; None where the config cannot express another width (ffn_fixed says why)
    ffn_width_key: str | None = "intermediate_size"
    ffn_fixed: str = ""
    # True where the layers' projections are transformers' Conv1D (y = x @ W + b, W (in_features, out_features))
    conv1d: bool = False
    # export.format values that carry the family (EXPORT_FORMATS order)
    export_formats: tuple[str, ...] = EXPORT_FORMATS
    # Hugging Face architecture classes that onnxruntime-genai's model builder (0.13) converts.
    genai_architectures: tuple[str, ...] = ()
    # For model types optimum-onnx registers no ONNX config for: optimum's NormalizedTextConfig attribute ->
    # this family's config key (num_layers, num_attention_heads, hidden_size); the export builds a plain
    # decoder-with-past config (position_ids input, one (batch, heads, past, head_dim) key and value per layer).
    optimum_config_keys: tuple[tuple[str, str], ...] = ()

    def format_problem(self, export_format: str) -> str | None:
        """One sentence naming the formats that can, when ``export_format`` cannot carry this family."""
        if export_format in self.export_formats:
            return None
        if not self.export_formats:
            return f"no export format carries a {self.name} model yet; set export.enabled: false."
        return (
            f"export.format '{export_format}' cannot carry a {self.name} model; use export.format: "
            f"{' or '.join(self.export_formats)}."
        )

    def ffn_fixed_problem(self) -> str | None:
        """Why structured FFN pruning cannot shrink this family's FFN (a clause), or None when it can."""
        if self.ffn_width_key is not None:
            return None
        return f"a {self.name} model's FFN width cannot change ({self.ffn_fixed})"


_LLAMA_LIKE = FamilySpec(
    name="Llama-like",
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

# Cohere (Command R, Aya 23): the Llama layout with a parallel attention/MLP block, LayerNorm, a tied head and
# logits multiplied by config.logit_scale inside the model's forward (so every runtime gets them scaled).
_COHERE = FamilySpec(name="cohere", model_types=("cohere",), export_formats=("optimum",))

# GPT-2 (and mGPT): transformer.h, Conv1D projections, learned positions; n_inner None means 4 × n_embd.
_GPT2 = FamilySpec(
    name="gpt2",
    model_types=("gpt2",),
    layers_path="transformer.h",
    embed_path="transformer.wte",
    ffn_gate=None,
    ffn_up="mlp.c_fc",
    ffn_down="mlp.c_proj",
    ffn_width_key="n_inner",
    conv1d=True,
    export_formats=("optimum",),
)

# OPT: model.decoder, fc1/fc2 directly in the layer, learned positions (offset 2); project_in/out around the
# layers when word_embed_proj_dim differs from hidden_size (the embedding and head are then that narrower width).
_OPT = FamilySpec(
    name="opt",
    model_types=("opt",),
    layers_path="model.decoder.layers",
    embed_path="model.decoder.embed_tokens",
    ffn_gate=None,
    ffn_up="fc1",
    ffn_down="fc2",
    ffn_width_key="ffn_dim",
    export_formats=("optimum",),
)

# XGLM: fc1/fc2 in the layer, sinusoidal positions, embeddings scaled by sqrt(d_model) (XGLMScaledWordEmbedding).
# Its position table zeroes the row of pad_token_id (1) and positions start at 2; a trimmed vocabulary keeps the
# pad id at or below 1 (new ids never exceed old ones), so the positions stay as they were.
_XGLM = FamilySpec(
    name="xglm",
    model_types=("xglm",),
    ffn_gate=None,
    ffn_up="fc1",
    ffn_down="fc2",
    ffn_width_key="ffn_dim",
    export_formats=("optimum",),
    optimum_config_keys=(
        ("num_layers", "num_layers"),
        ("num_attention_heads", "attention_heads"),
        ("hidden_size", "d_model"),
    ),
)

# BLOOM: transformer.h, ALiBi (no position embedding), word_embeddings_layernorm after the embedding.
_BLOOM = FamilySpec(
    name="bloom",
    model_types=("bloom",),
    layers_path="transformer.h",
    embed_path="transformer.word_embeddings",
    ffn_gate=None,
    ffn_up="mlp.dense_h_to_4h",
    ffn_down="mlp.dense_4h_to_h",
    ffn_width_key=None,
    ffn_fixed="BloomMLP is 4 × hidden_size wide by construction and its config has no key for another width",
    export_formats=("optimum",),
)

_SPECS = (_LLAMA_LIKE, _COHERE, _GPT2, _OPT, _XGLM, _BLOOM)
FAMILIES: dict[str, FamilySpec] = {t: spec for spec in _SPECS for t in spec.model_types}


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


def support_table() -> list[tuple[str, str]]:
    """(model types, export formats) per family, for the CLI and the README."""
    return [(", ".join(s.model_types), ", ".join(s.export_formats)) for s in _SPECS]


def unstructured_methods() -> str:
    """'prune.method a, b or c': the recipe's prune methods that zero weights and keep every shape."""
    from typing import get_args

    from converter.recipe import PruneConfig

    methods = [
        m for m in get_args(PruneConfig.model_fields["method"].annotation) if m not in ("none", "experts")
    ]
    return "prune.method " + (
        ", ".join(methods[:-1]) + " or " + methods[-1] if len(methods) > 1 else methods[0]
    )


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class TransposedLinear:
    """A transformers ``Conv1D`` (GPT-2: ``y = x @ W + b``, ``W`` (in_features, out_features)) seen as an
    ``nn.Linear``: ``weight`` is an (out_features, in_features) transposed view of the same storage, so in-place
    edits through it (masks, SparseGPT updates) reach the module; hooks register on the module itself."""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight.data.T  # (out_features, in_features), a view

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.bias

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1]

    def register_forward_pre_hook(self, hook, **kwargs):
        return self.module.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook, **kwargs):
        return self.module.register_forward_hook(hook, **kwargs)


def _conv1d_from_linear(lin: nn.Linear) -> nn.Module:
    """The Conv1D computing what ``lin`` computes (weight transposed to (in_features, out_features))."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
    conv.weight.data.copy_(lin.weight.data.T)
    if lin.bias is not None:
        conv.bias.data.copy_(lin.bias.data)
    else:
        conv.bias.data.zero_()
    return conv


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

    def _linear(self, mod: nn.Module):
        return TransposedLinear(mod) if self.spec.conv1d else mod

    def prunable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Every linear projection inside one decoder layer, by qualified name (q_proj, ..., down_proj), each
        with ``weight`` (out_features, in_features) (a Conv1D as a :class:`TransposedLinear` view)."""
        if self.spec.conv1d:
            from transformers.pytorch_utils import Conv1D

            return {
                name: TransposedLinear(mod) for name, mod in layer.named_modules() if isinstance(mod, Conv1D)
            }
        return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}

    def ffn(self, layer: nn.Module) -> tuple[nn.Linear | None, nn.Linear, nn.Linear]:
        """(gate, up, down) of one decoder layer's FFN, weights (out_features, in_features); gate is None for a
        plain MLP."""
        gate = self._linear(_get(layer, self.spec.ffn_gate)) if self.spec.ffn_gate else None
        return (
            gate,
            self._linear(_get(layer, self.spec.ffn_up)),
            self._linear(_get(layer, self.spec.ffn_down)),
        )

    def _require_resizable_ffn(self) -> None:
        why = self.spec.ffn_fixed_problem()
        if why:
            raise ModelError(
                f"structured FFN pruning cannot shrink this model: {why}; use {unstructured_methods()}."
            )

    def replace_ffn(self, layer: nn.Module, gate: nn.Linear | None, up: nn.Linear, down: nn.Linear) -> None:
        """Put new FFN projections (``nn.Linear``, e.g. shrunken ones) into ``layer``, as the family's module type."""
        self._require_resizable_ffn()
        for path, mod in ((self.spec.ffn_gate, gate), (self.spec.ffn_up, up), (self.spec.ffn_down, down)):
            if path is None:
                continue
            if isinstance(mod, TransposedLinear):
                mod = mod.module
            elif self.spec.conv1d and isinstance(mod, nn.Linear):
                mod = _conv1d_from_linear(mod)
            parent, _, name = path.rpartition(".")
            setattr(_get(layer, parent) if parent else layer, name, mod)

    def set_ffn_width(self, width: int) -> None:
        self._require_resizable_ffn()
        setattr(self.model.config, self.spec.ffn_width_key, int(width))

    def ffn_width(self) -> int:
        """The FFN width of the first decoder layer (every layer has the same)."""
        return self.ffn(self.decoder_layers()[0])[1].out_features

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
        return (
            f"head_dim {head_dim} is not a multiple of 16, which onnxruntime's CPU GroupQueryAttention needs"
        )
    if arch == "Gemma3ForCausalLM" and config.get("layer_types"):
        expected = [
            "sliding_attention" if (i + 1) % 6 else "full_attention"
            for i in range(len(config["layer_types"]))
        ]
        if list(config["layer_types"]) != expected:
            return "its layer_types differ from the five-local-one-global pattern the builder assumes for Gemma 3"
    return None
