/* block_wise_fp8 models end to end on the CUDA backend against the CPU
 * backend (`make test-gpu`; `make test` only builds this): every committed
 * fixture quantized online at load (--quantization block_wise_fp8), and the
 * Hugging Face FP8 checkpoint fixture (llama-fp8, quantization from its
 * config.json), each loaded on the CPU backend and on a fresh CUDA backend
 * with the same KV cache type (BF16):
 *  - the prompt's last-position logits within 2e-2 (max |diff| / max
 *    |logit|, the measure of test_cuda_model.c), the prompt in one step
 *    (M = prompt length: cuBLASLt's block-scaled GEMM with a GEMV tail of
 *    M % 4 rows, where the GPU has it) and in chunks of 5 (the GEMV kernel);
 *  - 32 greedy tokens from generate_run (decode steps recorded as CUDA
 *    graphs and replayed) identical on both backends.
 * Both backends quantize activations per token per 128 columns with the
 * same codes (test_cuda_fp8.c checks that bit for bit), so logits differ
 * by FP32 summation order, the tensor cores' accumulation and the BF16
 * activations of the unquantized GEMMs (lm_head, on the GPU). Needs a CUDA
 * device; fails (not skips) without one. */
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
static void test_hf_checkpoint(void) { check_model("llama-fp8", NULL); }

int main(void) {
    if (gpu_model_tests_start()) TEST_DONE("test_cuda_fp8_model");
    RUN(test_llama);
    RUN(test_mistral);
    RUN(test_qwen2);
    RUN(test_qwen3);
    RUN(test_ernie);
    RUN(test_hf_checkpoint);
    backend_destroy(cpu);
    TEST_DONE("test_cuda_fp8_model");
}
