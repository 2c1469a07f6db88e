"""Compiles the Triton kernels for a Hopper GPU (sm_90, the H100/H200) ahead of time, on any machine:
Triton's compiler and ptxas need no GPU. The interpreter that runs the kernels on the CPU checks no
shape rule of the real compiler (block size 4 once failed only on the H200: `tl.dot` needs K >= 16),
so tests/kernels/test_cuda_compile.py runs this in a process of its own, without TRITON_INTERPRET.

    python -m tests.helpers.cuda_compile  ->  one JSON line per variant: {"name", "error"} (error null: compiled)
"""
import json
import os
import sys

# (name, dtype, num_heads, num_kv_heads, head_dim, block_size, max_query_len, num_splits)
ATTENTION = [
    ("tiny_block4_prefill", "fp32", 4, 2, 16, 4, 6, 1),  # test_worker_model's shapes
    ("tiny_block4_decode", "fp32", 4, 2, 16, 4, 1, 1),
    ("smollm_decode", "fp32", 9, 3, 64, 16, 1, 1),
    ("smollm_decode_split8", "fp32", 9, 3, 64, 16, 1, 8),
    ("smollm_prefill", "fp32", 9, 3, 64, 16, 64, 1),
    ("llama1b_decode_split16", "bf16", 32, 8, 64, 16, 1, 16),
    ("llama1b_prefill", "bf16", 32, 8, 64, 16, 512, 1),
    ("llama8b_decode", "bf16", 32, 8, 128, 16, 1, 1),
    ("llama8b_decode_split32", "bf16", 32, 8, 128, 16, 1, 32),
    ("llama8b_prefill_block32", "bf16", 32, 8, 128, 32, 2048, 1),
    ("mha_block8_d80_split4", "fp16", 12, 12, 80, 8, 1, 4),
]
# Variants with a sliding window and/or soft-capping (Mistral, Gemma 2): name -> (window, softcap).
WINDOWED = {"mistral_window_prefill": (True, False), "mistral_window_decode_split8": (True, False),
            "gemma2_softcap_window_prefill": (True, True), "gemma2_softcap_decode": (False, True)}
ATTENTION += [
    ("mistral_window_prefill", "bf16", 32, 8, 128, 16, 512, 1),
    ("mistral_window_decode_split8", "bf16", 32, 8, 128, 16, 1, 8),
    ("gemma2_softcap_window_prefill", "bf16", 8, 4, 256, 16, 512, 1),
    ("gemma2_softcap_decode", "fp32", 4, 2, 16, 4, 1, 1),
]
# (name, dtype, num_kv_heads, head_dim)
WRITE_KV = [("write_kv_bf16", "bf16", 8, 128), ("write_kv_fp32", "fp32", 3, 64)]
# (name, dtype, token-expert pairs, hidden, moe intermediate, top_k): kernels/fused_moe.py
FUSED_MOE = [
    ("moe_tiny_fp32", "fp32", 12, 64, 32, 2),  # tests/worker/test_moe.py's shapes
    ("moe_qwen3_30b_decode64", "bf16", 64 * 8, 2048, 768, 8),
    ("moe_mixtral_prefill", "bf16", 2048 * 2, 4096, 14336, 2),
]
# (name, dtype, rank (sections x --max-lora-rank), longest segment): kernels/sgmv.py
SGMV = [("sgmv_decode_qkv_r16_bf16", "bf16", 48, 1), ("sgmv_prefill_r8_fp32", "fp32", 8, 512)]
NAMES = [v[0] for v in ATTENTION] + [v[0] for v in WRITE_KV] + [v[0] for v in FUSED_MOE] + [v[0] for v in SGMV]

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size


def signature(fn, constants: dict, pointer_types: dict, default_pointer: str) -> dict:
    """Triton types of fn's arguments: pointers as named (else default_pointer), `scale` fp32,
    other runtime scalars i32, constants constexpr."""
    def kind(name):
        if name in constants:
            return "constexpr"
        if name.endswith("_ptr"):
            return pointer_types.get(name, default_pointer)
        return "fp32" if name in ("scale", "softcap") else "i32"
    return {name: kind(name) for name in fn.arg_names}


def compile_one(fn, constants, pointer_types, default_pointer) -> str | None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        source = ASTSource(fn, signature(fn, constants, pointer_types, default_pointer), constexprs=constants)
        triton.compile(source, target=GPUTarget(*TARGET))
    except Exception as e:  # noqa: BLE001 - reported, per variant
        return f"{type(e).__name__}: {e}"[:2000]
    return None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter's kernels cannot be compiled")
    import triton

    from pagedserve.kernels.kv_write import _write_kv_kernel
    from pagedserve.kernels.paged_attention import (_combine_splits_kernel, _paged_attention_kernel, combine_constants,
                                         launch_constants)

    indices = {"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32"}
    for name, dtype, heads, kv_heads, head_dim, block_size, max_q, splits in ATTENTION:
        window, softcap = WINDOWED.get(name, (False, False))
        c = launch_constants(heads, kv_heads, head_dim, block_size, max_q, splits, window, softcap)
        partials = {"part_out_ptr": "*fp32", "part_ml_ptr": "*fp32"}
        error = compile_one(_paged_attention_kernel, c, {**indices, **partials}, f"*{dtype}")
        if error is None and splits > 1:
            error = compile_one(_combine_splits_kernel, combine_constants(c), partials, f"*{dtype}")
        print(json.dumps({"name": name, "error": error}), flush=True)
    for name, dtype, kv_heads, head_dim in WRITE_KV:
        c = dict(NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(kv_heads),
                 BLOCK_D=triton.next_power_of_2(head_dim))
        error = compile_one(_write_kv_kernel, c, {"slot_ptr": "*i64"}, f"*{dtype}")
        print(json.dumps({"name": name, "error": error}), flush=True)
    from pagedserve.kernels.fused_moe import _moe_down_kernel, _moe_gate_up_kernel, block_sizes
    routing = {"sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "weights_ptr": "*fp32"}
    for name, dtype, pairs, hidden, inter, top_k in FUSED_MOE:
        blocks = block_sizes(pairs, hidden, inter)
        error = compile_one(_moe_gate_up_kernel, {**blocks, "TOP_K": top_k}, routing, f"*{dtype}")
        if error is None:
            error = compile_one(_moe_down_kernel, blocks, routing, f"*{dtype}")
        print(json.dumps({"name": name, "error": error}), flush=True)
    from pagedserve.kernels.sgmv import _expand, _shrink
    from pagedserve.kernels.sgmv import block_sizes as sgmv_blocks
    segments = {"seg_start_ptr": "*i32", "seg_end_ptr": "*i32", "seg_slot_ptr": "*i32"}
    for name, dtype, rank, max_seg_len in SGMV:
        blocks = sgmv_blocks(rank, max_seg_len)
        error = compile_one(_shrink, {**blocks, "BLOCK_K": 64}, {**segments, "v_ptr": "*fp32"}, f"*{dtype}")
        if error is None:
            error = compile_one(_expand, {**blocks, "BLOCK_N": 64}, {**segments, "v_ptr": "*fp32"}, f"*{dtype}")
        print(json.dumps({"name": name, "error": error}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
