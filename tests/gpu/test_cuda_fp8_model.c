/* block_wise_fp8 models end to end on the CUDA backend against the CPU
 * backend (`make test-gpu`; `make test` only builds this): every committed
 * fixture quantized online at load (--quantization block_wise_fp8; qwen3-moe's
 * experts too), and the
 * Hugging Face FP8 checkpoint fixture (llama-fp8, quantization from its
 * config.json), each loaded on the CPU backend and on a fresh CUDA backend
 * with the same KV cache type (BF16):
 *  - the prompt's last-position logits within 3x the CPU's own noise from a
 *    BF16-vs-FP32 KV cache (gpu_model_test.h, cpu_kv_noise: activation
 *    quantization amplifies BF16 noise 20-30x on these fixtures) and at
 *    least 2e-2 (max |diff| / max |logit|), the prompt in one step
 *    (M = prompt length: cuBLASLt's block-scaled GEMM with a GEMV tail of
 *    M % 4 rows, where the GPU has it) and in chunks of 5 (the GEMV kernel);
 *  - 32 greedy tokens from generate_run (decode steps recorded as CUDA
 *    graphs and replayed) on both backends, the common prefix printed.
 * Both backends quantize activations per token per 128 columns with the
 * same function (test_cuda_fp8.c checks the codes bit for bit), but the
 * inputs to that quantization differ by FP32 summation order, the tensor
 * cores' BF16 attention and the BF16 activations of the unquantized GEMMs
 * (lm_head, on the GPU); an activation near a code boundary then takes
 * the other code, which is why the limits above are looser than for BF16
 * models. Needs a CUDA device (or the emulator, tests/cuemu); fails (not
 * skips) without one. */
#include "tests/gpu/gpu_model_test.h"

/* one step (cuBLASLt with a GEMV tail) and chunks of 5 (the GEMV kernel) */
static const int CHUNKS[] = {256, 5};

/* name: the fixture; quant: the --quantization setting (NULL: the
 * checkpoint's own). */
static void check_model(const char *name, const char *quant) {
    char dir[256];
    snprintf(dir, sizeof dir, "tests/fixtures/models/%s", name);
    check_quant_model(name, dir, quant, quant ? quant : "checkpoint fp8", NB_FP8_B128, CHUNKS, 2);
}

static void test_llama(void) { check_model("llama", "block_wise_fp8"); }
static void test_mistral(void) { check_model("mistral", "block_wise_fp8"); }
static void test_qwen2(void) { check_model("qwen2", "block_wise_fp8"); }
static void test_qwen3(void) { check_model("qwen3", "block_wise_fp8"); }
static void test_ernie(void) { check_model("ernie", "block_wise_fp8"); }
/* FP8 experts: the grouped GEMV (the fixture's prompt is short) for the
 * prompt, its chunks and the decode steps, which are recorded */
static void test_moe(void) { check_model("qwen3-moe", "block_wise_fp8"); }
static void test_hf_checkpoint(void) { check_model("llama-fp8", NULL); }

int main(void) {
    if (gpu_model_tests_start()) TEST_DONE("test_cuda_fp8_model");
    RUN(test_llama);
    RUN(test_mistral);
    RUN(test_qwen2);
    RUN(test_qwen3);
    RUN(test_ernie);
    RUN(test_moe);
    RUN(test_hf_checkpoint);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_fp8_model");
}
