"""Architecture knowledge as data: where the decoder blocks are and which module feeds which Linears.

Every calibrated method (GPTQ, AWQ, SmoothQuant, SmoothQuant+) reads this table instead of testing
class names in code. An architecture that is not listed fails loudly with the list of known ones;
adding one is a new :class:`ArchMapping` entry (module names relative to a decoder block).

Scaling groups (:class:`ScaleGroup`) follow the AWQ reference (``llm-awq auto_scale.py``,
``AutoAWQ awq/models/llama.py get_layers_for_scaling``) and SmoothQuant+ (paper fig. 5):

1. ``input_layernorm -> [q_proj, k_proj, v_proj]`` (inspect: the whole attention),
2. ``v_proj -> [o_proj]`` only when v_proj and o_proj have the same shape (no GQA; llm-awq PR #67),
3. ``post_attention_layernorm -> [gate_proj, up_proj]`` (inspect: the whole MLP),
4. ``up_proj -> [down_proj]`` (inspect: down_proj).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from torch import nn

from quantlab.errors import ConfigError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that share one input, and the module that produces it.

    Attributes:
        prev: module (relative to the block) whose output is the shared input: an RMSNorm
            (``prev_kind="norm"``) or a Linear whose output rows can absorb 1/s (``"linear"``).
        prev_kind: ``norm`` or ``linear``.
        linears: the consuming Linears (relative names); their input columns are multiplied by s.
        inspect: module whose output AWQ's loss compares (relative name).
        needs_same_shape: only valid when ``prev`` and the single consumer have the same weight
            shape (v_proj -> o_proj without grouped-query attention).
    """

    prev: str
    prev_kind: str
    linears: tuple[str, ...]
    inspect: str
    needs_same_shape: bool = False

    @property
    def key(self) -> str:
        """Stable artifact key, e.g. ``input_layernorm->q_proj,k_proj,v_proj``."""
        return f"{self.prev}->{','.join(n.rsplit('.', 1)[-1] for n in self.linears)}"


@dataclass(frozen=True)
class ArchMapping:
    """Where things are in one architecture (names are attribute paths).

    Attributes:
        layers: path of the ``nn.ModuleList`` of decoder blocks (from the CausalLM).
        pre_blocks: modules run before the first block (embeddings, rotary embedding).
        final_norm: the norm after the last block.
        lm_head: the output projection.
        groups: scaling groups inside one block.
        kv: the Linears whose outputs are the attention keys and values (relative names), before
            RoPE: where LLM-QAT quantizes the KV cache (per token, all heads jointly).
        sequential: GPTQ true-sequential order inside a block (each inner tuple shares one input
            and is quantized together, later subsets see earlier ones quantized).
        residual: the block's pre-norm residual stages in order, ``(norm, module)``: the block computes
            ``h = h + module(norm(h))`` for each and returns ``h`` (Llama: attention, then MLP). Empty
            when the block is not of that form. AWQ then carries one activation stream through a block
            instead of caching every inspected module's input and the block's outputs.
        outputs: ``(module, linear)``: the module returns that Linear's output as it is (Llama: the MLP
            returns ``down_proj``'s). With ``residual``, the block's output is then the last stage's
            residual plus that Linear's output, which lets the lockstep forward end a chunk at the
            Linear (:func:`quantlab.calib.lockstep.lockstep_forward`; checked bit for bit on one chunk).
    """

    layers: str
    pre_blocks: tuple[str, ...]
    final_norm: str
    lm_head: str
    groups: tuple[ScaleGroup, ...]
    sequential: tuple[tuple[str, ...], ...]
    kv: tuple[str, ...] = ()
    residual: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return cast(nn.ModuleList, model.get_submodule(self.layers))

    def block_name(self, index: int) -> str:
        return f"{self.layers}.{index}"

    def block_linears(self, model: nn.Module) -> set[str]:
        """Model-level names of every Linear the mapping lists inside the decoder blocks."""
        rel = {n for sub in self.sequential for n in sub}
        return {f"{self.block_name(i)}.{n}" for i in range(len(self.blocks(model))) for n in rel}

    def applicable_groups(self, block: nn.Module) -> list[ScaleGroup]:
        """The groups valid for this block (drops v->o under grouped-query attention)."""
        out = []
        for g in self.groups:
            if g.needs_same_shape:
                prev_w = block.get_submodule(g.prev).weight
                if any(block.get_submodule(n).weight.shape != prev_w.shape for n in g.linears):
                    continue
            out.append(g)
        return out


_LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", "linear", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
    ScaleGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", "linear", ("mlp.down_proj",), "mlp.down_proj"),
)

LLAMA = ArchMapping(
    layers="model.layers",
    pre_blocks=("model.embed_tokens", "model.rotary_emb"),
    final_norm="model.norm",
    lm_head="lm_head",
    groups=_LLAMA_GROUPS,
    # GPTQ llama.py llama_sequential: [k, v, q] -> [o] -> [up, gate] -> [down]
    sequential=(
        ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"),
        ("self_attn.o_proj",),
        ("mlp.up_proj", "mlp.gate_proj"),
        ("mlp.down_proj",),
    ),
    kv=("self_attn.k_proj", "self_attn.v_proj"),
    # LlamaDecoderLayer.forward: h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))
    residual=(("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")),
    # LlamaMLP.forward: return down_proj(act_fn(gate_proj(x)) * up_proj(x))
    outputs=(("mlp", "mlp.down_proj"),),
)

# HF architecture name (config.architectures[0] / class name) -> mapping.
# Llama, Llama-2, Code Llama and SmolLM2 are all LlamaForCausalLM; Mistral uses the same layout.
ARCH_MAPPINGS: dict[str, ArchMapping] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
}


def relative_names(names: Iterable[str], block_name: str) -> list[str]:
    """The names inside ``block_name``, relative to it (``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``)."""
    pre = block_name + "."
    return [n[len(pre):] for n in names if n.startswith(pre)]


def get_mapping(model: nn.Module) -> ArchMapping:
    """The mapping for ``model``'s class; :class:`ConfigError` naming the class if unknown."""
    arch = type(model).__name__
    try:
        mapping = ARCH_MAPPINGS[arch]
    except KeyError:
        known = ", ".join(sorted(ARCH_MAPPINGS))
        raise ConfigError(
            "model",
            f"calibrated methods have no layer mapping for architecture {arch!r} (known: {known}); "
            "add an ArchMapping to quantlab.models.mappings.ARCH_MAPPINGS",
        ) from None
    _check(model, mapping, arch)
    return mapping


def _check(model: nn.Module, mapping: ArchMapping, arch: str) -> None:
    """Fail early if a listed module is missing (e.g. a renamed attribute in a new transformers)."""
    try:
        blocks = mapping.blocks(model)
        block = blocks[0]
        for g in mapping.groups:
            for rel in (g.prev, *g.linears, g.inspect):
                block.get_submodule(rel)
        for rel in (*mapping.kv, *(n for stage in (*mapping.residual, *mapping.outputs) for n in stage)):
            block.get_submodule(rel)
        for path in (*mapping.pre_blocks, mapping.final_norm, mapping.lm_head):
            model.get_submodule(path)
    except (AttributeError, IndexError) as exc:
        raise ConfigError("model", f"{arch}: module layout does not match its mapping ({exc})") from None
