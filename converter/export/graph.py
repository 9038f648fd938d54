"""ONNX graph surgery: a tied embedding stored once, in float, dynamic int8 or block-quantized form.

Exporters write the embedding ``E (V, H)`` and the lm_head weight ``W (H, V) == E.T`` as two initializers (the
TorchScript exporter folds ``lm_head.weight.T``). These edits make the embedding read the lm_head's weight, so
the tied matrix is stored once on disk and in memory, whatever the precision of the lm_head:

- float: ``Gather(E, ids)`` -> ``Transpose(Gather(W, ids, axis=1))`` (:func:`tie_transposed_embedding`);
- dynamic int8: the Gather reads ``W_quantized`` and dequantizes per gathered row (:func:`share_quantized_gather`);
- MatMulNBits (block-quantized int4/int8): ``GatherBlockQuantized`` reads the lm_head's packed blocks, which
  are laid out (V, H/block, block·bits/8): one row per vocabulary entry (:func:`share_block_quantized_embedding`).
"""

from __future__ import annotations

import logging
from typing import Any

from converter.export.io import array

log = logging.getLogger(__name__)


def consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def tie_transposed_embedding(model: Any) -> list[tuple[str, str]]:
    """Rewrite ``Gather(E, ids)`` to ``Transpose(Gather(W, ids, axis=1))`` wherever a MatMul weight W == E.T.

    Returns the (embedding, lm_head) initializer name pairs that were tied; E is removed from the graph.
    """
    import numpy as np
    from onnx import helper

    inits = {t.name: t for t in model.graph.initializer}
    users_of = consumers(model)
    # candidate lm_head weights: 2-D MatMul B initializers, by (in, out) shape
    matmul_b: dict[tuple[int, ...], list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            matmul_b.setdefault(tuple(inits[node.input[1]].dims), []).append(node.input[1])

    tied: list[tuple[str, str]] = []
    for name, init in list(inits.items()):
        users = users_of.get(name, [])
        if (
            len(init.dims) != 2
            or not users
            or any(n.op_type != "Gather" or n.input[0] != name or _axis(n) != 0 for n in users)
        ):
            continue
        rows, cols = init.dims  # (vocab, hidden)
        emb = None
        for cand in matmul_b.get((cols, rows), []):
            cinit = inits[cand]
            if cinit.data_type != init.data_type:
                continue
            emb = array(init) if emb is None else emb
            if np.array_equal(emb.T, array(cinit)):
                for node in users:
                    _rewrite_gather_transposed(model, node, cand, helper)
                model.graph.initializer.remove(init)
                tied.append((name, cand))
                log.info("export: embedding %s shares the lm_head weight %s (stored once)", name, cand)
                break
    return tied


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _rewrite_gather_transposed(model: Any, node: Any, weight_t: str, helper: Any) -> None:
    """Gather(E (V, H), ids (B, S)) -> Transpose(Gather(W (H, V), ids, axis=1) (H, B, S), perm=[1, 2, 0])."""
    rank = _rank_of(model, node.input[1])
    out = node.output[0]
    mid = f"{node.name or out}/tied_gather_output"
    idx = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    new = [
        helper.make_node("Gather", [weight_t, node.input[1]], [mid], name=f"{node.name}_tied", axis=1),
        helper.make_node(
            "Transpose", [mid], [out], name=f"{node.name}_tied_T", perm=[*range(1, rank + 1), 0]
        ),
    ]
    for i, n in enumerate(new):
        model.graph.node.insert(idx + i, n)


def _rank_of(model: Any, name: str) -> int:
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return 2  # input_ids (batch, seq)


def share_quantized_gather(model: Any) -> list[str]:
    """Point tied Gathers (axis=1 on a float W (H, V)) at W's int8 copy and dequantize per gathered token.

    After quantize_dynamic, W survives in float only for the Gather; ``W_quantized`` (H, V) int8 with
    ``W_scale``/``W_zero_point`` of shape (V,) or () exist for the MatMulInteger. The new subgraph is
    ``(Cast(Transpose(Gather(Wq, ids, axis=1))) - zp[ids]) * scale[ids]``; W is removed.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    users_of = consumers(model)
    shared: list[str] = []
    for name, init in list(inits.items()):
        q, s, z = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"
        if q not in inits or s not in inits or z not in inits:
            continue
        users = users_of.get(name, [])
        gathers = [n for n in users if n.op_type == "Gather" and n.input[0] == name and _axis(n) == 1]
        if not gathers or len(gathers) != len(users):
            continue
        per_channel = len(inits[s].dims) == 1
        has_zp = bool(array(inits[z]).any())
        for node in gathers:
            transpose = next(n for n in users_of.get(node.output[0], []) if n.op_type == "Transpose")
            ids, out, base = node.input[1], transpose.output[0], node.name or name
            rank = _rank_of(model, ids)
            idx = list(model.graph.node).index(node)
            for old in (node, transpose):
                model.graph.node.remove(old)
            axes = f"{base}/dq_axes"
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
            new = [
                helper.make_node("Gather", [q, ids], [f"{base}/q"], name=f"{base}_q", axis=1),  # (H, B, S)
                helper.make_node(
                    "Transpose",
                    [f"{base}/q"],
                    [f"{base}/qT"],
                    name=f"{base}_qT",
                    perm=[*range(1, rank + 1), 0],
                ),  # (B, S, H)
                helper.make_node(
                    "Cast", [f"{base}/qT"], [f"{base}/qf"], name=f"{base}_qf", to=TensorProto.FLOAT
                ),
            ]
            vals = f"{base}/qf"
            if has_zp:
                new += [
                    helper.make_node("Gather", [z, ids], [f"{base}/zp"], name=f"{base}_zp", axis=0),
                    helper.make_node(
                        "Cast", [f"{base}/zp"], [f"{base}/zpf"], name=f"{base}_zpf", to=TensorProto.FLOAT
                    ),
                    helper.make_node("Unsqueeze", [f"{base}/zpf", axes], [f"{base}/zpu"], name=f"{base}_zpu")
                    if per_channel
                    else helper.make_node("Identity", [f"{base}/zpf"], [f"{base}/zpu"]),
                    helper.make_node("Sub", [vals, f"{base}/zpu"], [f"{base}/centered"], name=f"{base}_sub"),
                ]
                vals = f"{base}/centered"
            if per_channel:  # one scale per vocabulary row: (B, S) -> (B, S, 1)
                new += [
                    helper.make_node("Gather", [s, ids], [f"{base}/sc"], name=f"{base}_sc", axis=0),
                    helper.make_node("Unsqueeze", [f"{base}/sc", axes], [f"{base}/scu"], name=f"{base}_scu"),
                    helper.make_node("Mul", [vals, f"{base}/scu"], [out], name=f"{base}_dq"),
                ]
            else:
                new.append(helper.make_node("Mul", [vals, s], [out], name=f"{base}_dq"))
            for i, n in enumerate(new):
                model.graph.node.insert(idx + i, n)
        model.graph.initializer.remove(init)
        shared.append(name)
        log.info("export: embedding Gather reads the int8 lm_head weight %s", q)
    return shared


def tied_embedding_gathers(model: Any, weight: str) -> list[tuple[list[Any], str, str]]:
    """Where an embedding reads the lm_head weight ``W (H, V)``: ``(nodes, ids, output)`` per lookup.

    Two shapes occur: ``Transpose(Gather(W, ids, axis=1))`` (:func:`tie_transposed_embedding`'s) and
    ``Gather(Transpose(W), ids)`` (onnxruntime-genai's builder). Both give the (B, S, H) embedding rows.
    """
    users_of = consumers(model)
    found = []
    for node in users_of.get(weight, []):
        if node.op_type == "Gather" and node.input[0] == weight and _axis(node) == 1:
            nxt = [n for n in users_of.get(node.output[0], []) if n.op_type == "Transpose"]
            if len(nxt) == 1 and len(users_of.get(node.output[0], [])) == 1:
                found.append(([node, nxt[0]], node.input[1], nxt[0].output[0]))
        elif node.op_type == "Transpose" and list(_perm(node)) == [1, 0]:
            nxt = users_of.get(node.output[0], [])
            if nxt and all(
                n.op_type == "Gather" and n.input[0] == node.output[0] and _axis(n) == 0 for n in nxt
            ):
                for g in nxt:
                    found.append(([node, g] if g is nxt[0] else [g], g.input[1], g.output[0]))
    return found


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def share_block_quantized_embedding(
    model: Any, weight: str, packed: str, scales: str, zero_points: str | None, bits: int, block_size: int
) -> bool:
    """Replace the tied embedding's lookups of float ``weight`` (H, V) by ``GatherBlockQuantized`` on the
    lm_head's MatMulNBits blocks (the caller drops ``weight`` once nothing reads it). Returns whether it did.

    MatMulNBits stores ``packed`` as (V, H/block, block·bits/8) uint8 and ``scales`` as (V, H/block): row v holds
    the quantized embedding of token v, blocked along the hidden axis, which is GatherBlockQuantized's layout
    for ``gather_axis=0, quantize_axis=1`` once the packed tensor is viewed as (V, H·bits/8). Symmetric blocks
    carry no zero points: both operators then use the same implicit one (2^(bits-1)).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    lookups = tied_embedding_gathers(model, weight)
    if not lookups:
        return False
    inits = {t.name: t for t in model.graph.initializer}
    vocab, blocks, blob = inits[packed].dims
    flat = f"{packed}/rows_shape"
    model.graph.initializer.append(numpy_helper.from_array(np.array([vocab, blocks * blob], np.int64), flat))
    rows = f"{packed}/rows"
    nodes = list(model.graph.node)
    first = min(nodes.index(n) for group, _, _ in lookups for n in group)
    new = [helper.make_node("Reshape", [packed, flat], [rows], name=f"{packed}/rows_reshape")]
    for i, (group, ids, out) in enumerate(lookups):
        for n in group:
            model.graph.node.remove(n)
        inputs = [rows, ids, scales] + ([zero_points] if zero_points else [])
        new.append(
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                [out],
                name=f"/model/embed_tokens/GatherBlockQuantized_{i}",
                domain="com.microsoft",
                bits=bits,
                block_size=block_size,
                gather_axis=0,
                quantize_axis=1,
            )
        )
    for i, n in enumerate(new):
        model.graph.node.insert(first + i, n)
    log.info("export: embedding lookups read the lm_head's %d-bit blocks %s (stored once)", bits, packed)
    return True


def fold_transposed_weights(model: Any) -> int:
    """``MatMul(x, Transpose(E))`` with an initializer E -> ``MatMul(x, W)`` with the initializer ``W = E.T``.

    optimum ties some families' lm_head to the embedding this way (``embed_tokens.weight_transposed``); a
    quantizer needs the MatMul weight as a constant. The embedding Gather keeps reading E until
    :func:`tie_transposed_embedding` points it at W. Returns how many weights were folded.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    users_of = consumers(model)
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        tr = producer.get(node.input[1])
        if (
            tr is None
            or tr.op_type != "Transpose"
            or tr.input[0] not in inits
            or _perm(tr) not in ([1, 0], [])
        ):
            continue
        src = inits[tr.input[0]]
        if len(src.dims) != 2:
            continue
        name = f"{src.name}.T"
        if name not in inits:
            arr = array(src)
            model.graph.initializer.append(numpy_helper.from_array(arr.T.copy(), name))
            inits[name] = model.graph.initializer[-1]
        node.input[1] = name
        if all(u is node for u in users_of.get(tr.output[0], [])):
            model.graph.node.remove(tr)
        folded += 1
    return folded


def gemm_to_matmul(model: Any) -> int:
    """``Gemm(A, B, C)`` with a constant 2-D B, alpha = beta = 1 and no transA -> ``Add(MatMul(A, W), C)`` with the
    initializer ``W (K, N)`` (``B``, or ``B.T`` under transB), so that weight quantization sees one MatMul layout.

    The TorchScript exporter writes a Gemm for a linear on 2-D input: transformers' Conv1D (GPT-2, ``addmm``) and
    OPT's FFN (its layer flattens the tokens before fc1/fc2). Returns how many Gemms were rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    users_of = consumers(model)
    done = 0
    for node in list(model.graph.node):
        if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: (a.f if a.type == a.FLOAT else a.i) for a in node.attribute}
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
            continue
        b = inits[node.input[1]]
        if len(b.dims) != 2:
            continue
        weight = b.name
        if attrs.get("transB", 0):
            weight = f"{b.name}.T"
            if weight not in inits:
                model.graph.initializer.append(numpy_helper.from_array(array(b).T.copy(), weight))
                inits[weight] = model.graph.initializer[-1]
            if all(u is node for u in users_of.get(b.name, [])):
                model.graph.initializer.remove(b)
        base = node.name or node.output[0]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{base}/matmul_output" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{base}_MatMul")]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{base}_Add"))
        idx = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for i, n in enumerate(new):
            model.graph.node.insert(idx + i, n)
        done += 1
    return done
