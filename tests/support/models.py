"""Model settings the tests share."""

# Settings under which llama.cpp's CPU path matches the float64 reference to float32 round-off:
# F32 KV cache and no flash attention (see test_reference_model.py for the measured errors).
TIGHT_LLAMA_KWARGS = dict(flash_attn=False, type_k=0, type_v=0, n_threads=2)  # 0 = GGML_TYPE_F32
