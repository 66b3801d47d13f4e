/* GPU benchmarks of the CUDA backend (issue 5).
 *
 *   build/bench/bench_cuda [--ops] [--model DIR] [options]
 *
 * Prints, on the device named in its first line:
 *  - the measured device copy bandwidth (cudaMemcpy device to device of
 *    1 GiB, read + written bytes per second, best of 5): the roofline that
 *    every "of copy" fraction below divides by. A kernel that only reads can
 *    exceed it (its traffic is one-way), so fractions above 1 are possible;
 *  - --ops: per-op times of the backend ops (kernels/backend.h) on
 *    Llama-3-8B shapes: matmul against a plain cublasGemmEx (BF16 x BF16 ->
 *    FP32, CUBLAS_COMPUTE_32F, default algorithm, BF16 activations) on the
 *    same shapes, then the quantized formats (WINT8, WINT4 group 128 and
 *    per-channel, WINT2, block-wise FP8) against the same cuBLAS BF16 at M
 *    = 1 .. 4096 (bench_cuda_quant.c), grouped expert products on
 *    Qwen3-30B-A3B's experts (bench_cuda_moe.c), rmsnorm, add_rmsnorm,
 *    rope, silu_mul, kv_write, decode attention and prefill attention;
 *  - --model DIR: end-to-end decode tokens/s of model_forward at each
 *    --batches size, against the bandwidth bound (weight + KV bytes read per
 *    step / copy bandwidth), with the weights as stored or quantized at
 *    load (--quantization).
 *
 * Timing. The backend's ops run on a stream of its own that backend.h does
 * not expose, so CUDA events cannot be placed in it; a backend op is timed
 * on the host clock between two ops->sync() around many calls. Unless
 * --no-graph is given, the calls are recorded once with ops->graph_begin /
 * graph_end (as model_forward records a decode step) and replayed, so
 * launch gaps do not count, as in a decode step. cuBLAS runs on our own
 * stream, timed with CUDA events, and is recorded into a CUDA graph the same
 * way. Every figure is the average over a loop of at least --min-time
 * seconds after a warm-up. Prefill attention is timed without graphs (one
 * call is long; the model never records prefill steps).
 *
 * L2. A weight read by every call of a loop would stay in the L2 cache (an
 * H100's holds 50 MiB; a 4096 x 4096 WINT4 weight is 8), where a decode
 * step reads each layer's weights once, from memory: the bandwidth figures
 * would exceed the memory's. So a timed loop cycles through copies of its
 * operand (weights, KV caches, expert routings) that together hold twice
 * the L2 (bench_copies), and the cuBLAS reference does the same.
 *
 * What is timed is checked: a matmul or expert figure whose output
 * disagrees with its reference is marked MISMATCH, and bench_cuda then
 * exits 1 after printing everything. --smoke runs every figure on small
 * sizes in the fewest repetitions: tests/test_bench_cuda.py runs it on the
 * CPU emulator in make test, so the benchmark is proven before a GPU runs it.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_cuda.h"
#include "common/err.h"
#include "common/log.h"
#include "common/util.h"
#include "engine/model/config.h"
#include "engine/model/model.h"
#include "engine/model/safetensors.h"
#include "kernels/backend.h"

#define MAX_BATCHES 16

/* ---- end-to-end decode -------------------------------------------------------------- */

static void bench_decode(const char *dir, const nb_quant_plan *quant, const int *batches, int n_batches, int prompt,
                         int steps, int max_batch_tokens, double bw) {
    enum { WARM = 3 };
    nb_err e;
    memset(&e, 0, sizeof e);
    nb_model_config cfg;
    if (config_load(dir, &cfg, &e)) bench_die("%s", e.msg);
    int max_b = 0;
    for (int i = 0; i < n_batches; i++)
        if (batches[i] > max_b) max_b = batches[i];
    /* every batch size decodes WARM + steps tokens from position `prompt`
     * on, twice (logits, then argmax; the second pass rewrites the same KV
     * slots), in the same sequences */
    int span = prompt + WARM + steps, bps = (span + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    if (span > cfg.max_position)
        bench_die("%s: --context %d plus %d decode steps needs %d positions; the model has %d", dir, prompt, WARM + steps, span,
            cfg.max_position);
    if (max_batch_tokens < max_b) max_batch_tokens = max_b;

    nb_backend *b = cuda_backend_create(bench_opts.device, &e);
    if (!b) bench_die("CUDA backend: %s", e.msg);
    nb_model_opts mo;
    memset(&mo, 0, sizeof mo);
    mo.max_batch_tokens = max_batch_tokens;
    mo.num_kv_blocks = max_b * bps;
    mo.quant = quant;
    double t0 = util_now();
    nb_model *m = model_load(dir, b, &mo, &e);
    if (!m) bench_die("%s", e.msg);
    double load_s = util_now() - t0;
    const nb_model_config *c = model_config(m);
    int V = c->vocab_size, L = c->n_layers;
    nb_attn_shape s = {c->n_heads, c->n_kv_heads, c->head_dim, 0, model_quant_plan(m)->kv, 0, 0};
    double kv_tok = 2.0 * L * (double)bench_kv_token_bytes(&s); /* K and V, all layers, one token */

    /* weight bytes read per step: all resident weights, except that of an
     * untied embedding table only the step's rows are read */
    double wtotal = 0;
    char wdesc[256] = "";
    for (int t = 0, len = 0; t < NB_DTYPE_COUNT; t++) {
        size_t by = model_weight_bytes(m, (nb_dtype)t);
        wtotal += (double)by;
        if (by && len < (int)sizeof wdesc)
            len += snprintf(wdesc + len, sizeof wdesc - (size_t)len, "%s%s %.2f GB", len ? ", " : "",
                            nb_dtype_name((nb_dtype)t), by / 1e9);
    }
    st_model *st = st_open(dir, &e);
    if (!st) bench_die("%s", e.msg);
    const st_tensor *et = st_find(st, "model.embed_tokens.weight");
    if (!et) bench_die("%s: no model.embed_tokens.weight", dir);
    double emb_bytes = (double)et->nbytes, emb_row = emb_bytes / V;
    st_close(st);
    double w_fixed = c->tie_embeddings ? wtotal : wtotal - emb_bytes;
    /* a mixture reads only the experts a step's tokens pick: with the
     * random router of a synthetic model every expert is as likely, so a
     * step of B tokens reads the expected share 1 - (1 - used/E)^B of them
     * (a layer's tokens pick distinct experts) */
    double w_experts = (double)model_expert_bytes(m);
    w_fixed -= w_experts;

    printf("\ndecode: %s (%s, %d layers, hidden %d, vocab %d, %s lm_head), weights %s, KV cache %s; load %.1f s\n", dir,
           c->arch_name, L, c->hidden_size, V, c->tie_embeddings ? "tied" : "untied", wdesc, nb_kv_dtype_name(s.kv_dtype),
           load_s);
    printf("bound = (weight bytes read per step + KV bytes read per step) / copy bandwidth; weights read per step:\n"
           "%.3f GB (every linear and norm weight and the lm_head%s; of the embedding only the step's rows);\n"
           "KV %.0f KiB per token of context (all layers, K and V)\n",
           w_fixed / 1e9, c->tie_embeddings ? " = the embedding" : "", kv_tok / 1024.0);
    if (w_experts > 0)
        printf("plus experts: %.3f GB, of which a step of B tokens reads the share 1 - (1 - %d/%d)^B expected of\n"
               "uniform routing (the synthetic router's weights are random)\n",
               w_experts / 1e9, c->moe.n_used, c->moe.n_experts);

    /* sequence s owns blocks s * bps ...; the first B rows serve batch B */
    int32_t *tables = xmalloc(sizeof(int32_t) * (size_t)max_b * bps);
    for (int i = 0; i < max_b * bps; i++) tables[i] = i;
    int cap = max_batch_tokens > max_b ? max_batch_tokens : max_b;
    int32_t *tok = xmalloc(sizeof(int32_t) * cap), *pos = xmalloc(sizeof(int32_t) * cap),
            *seq = xmalloc(sizeof(int32_t) * cap), *slot = xmalloc(sizeof(int32_t) * cap),
            *rows = xmalloc(sizeof(int32_t) * cap), *ids = xmalloc(sizeof(int32_t) * cap),
            *step_tables = xmalloc(sizeof(int32_t) * (size_t)cap * bps);
    float *logits = xmalloc(sizeof(float) * (size_t)max_b * V);
    for (int i = 0; i < cap; i++) rows[i] = i;
    nb_sample_row *smp = xcalloc((size_t)cap, sizeof *smp);
    for (int i = 0; i < cap; i++)
        smp[i] = (nb_sample_row){.temperature = 1.0f, .top_p = 0.9f, .repetition_penalty = 1.0f,
                                 .u = (i + 0.5) / cap};

    /* prefill: max_b sequences of `prompt` random tokens, packed into steps
     * of at most max_batch_tokens tokens */
    t0 = util_now();
    int n_steps = 0;
    for (int s0 = 0, p0 = 0; s0 < max_b;) {
        int n = 0, n_seqs = 0, last = -1;
        while (n < max_batch_tokens && s0 < max_b) {
            if (s0 != last) {
                memcpy(step_tables + (size_t)n_seqs * bps, tables + (size_t)s0 * bps, sizeof(int32_t) * bps);
                n_seqs++;
                last = s0;
            }
            tok[n] = bench_rand_token(V);
            pos[n] = p0;
            seq[n] = n_seqs - 1;
            slot[n] = tables[(size_t)s0 * bps + p0 / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p0 % NB_KV_BLOCK_SIZE;
            n++;
            if (++p0 == prompt) s0++, p0 = 0;
        }
        nb_batch bt = {n, pos, seq, slot, n_seqs, bps, step_tables};
        if (model_forward(m, tok, &bt, NULL, 0, NULL, &e)) bench_die("prefill: %s", e.msg);
        n_steps++;
    }
    b->ops->sync(b);
    double pf = util_now() - t0;
    printf("prefill: %d sequences x %d tokens in %d steps of <= %d tokens: %.2f s, %.0f tok/s\n", max_b, prompt, n_steps,
           max_batch_tokens, pf, (double)max_b * prompt / pf);

    printf("decode, one token per sequence per step, %d timed steps after %d warm-up, context %d..%d:\n"
           "logits = model_forward (all rows' logits to the host), sample = model_forward_sample\n"
           "(temperature 1, top-p 0.9, drawn on the device)\n",
           steps, WARM, prompt, span - 1);
    printf("  %5s %14s %10s %14s %10s %14s %9s %9s %8s %8s\n", "batch", "logits tok/s", "ms/step", "sample tok/s",
           "ms/step", "bound tok/s", "weight GB", "KV GB", "ratio", "ratio");
    for (int bi = 0; bi < n_batches; bi++) {
        int B = batches[bi];
        double rate[2], ms[2], kv_read = 0;
        for (int t = 0; t < B; t++) ids[t] = t % V;
        for (int phase = 0; phase < 2; phase++) {
            double ts = 0;
            for (int i = 0; i < WARM + steps; i++) {
                int p = prompt + i;
                if (i == WARM) ts = util_now();
                for (int t = 0; t < B; t++) {
                    tok[t] = ids[t];
                    pos[t] = p;
                    seq[t] = t;
                    slot[t] = tables[(size_t)t * bps + p / NB_KV_BLOCK_SIZE] * NB_KV_BLOCK_SIZE + p % NB_KV_BLOCK_SIZE;
                }
                nb_batch bt = {B, pos, seq, slot, B, bps, tables};
                if (phase == 0) {
                    if (model_forward(m, tok, &bt, rows, B, logits, &e)) bench_die("decode: %s", e.msg);
                    for (int t = 0; t < B; t++) ids[t] = bench_rand_token(V);
                } else if (model_forward_sample(m, tok, &bt, rows, B, smp, ids, &e)) {
                    bench_die("decode: %s", e.msg);
                }
                if (i >= WARM && phase == 0) kv_read += (double)B * (p + 1) * kv_tok;
            }
            double dt = util_now() - ts;
            rate[phase] = (double)B * steps / dt;
            ms[phase] = dt / steps * 1e3;
        }
        kv_read /= steps;
        double share = w_experts > 0 ? 1.0 - pow(1.0 - (double)c->moe.n_used / c->moe.n_experts, B) : 0.0;
        double wread = w_fixed + share * w_experts + B * emb_row, bound_step = (wread + kv_read) / bw,
               bound = B / bound_step;
        printf("  %5d %14.1f %10.3f %14.1f %10.3f %14.1f %9.2f %9.3f %8.2f %8.2f\n", B, rate[0], ms[0], rate[1], ms[1],
               bound, wread / 1e9, kv_read / 1e9, rate[0] / bound, rate[1] / bound);
    }
    printf("  (ratio = tok/s / bound tok/s, for logits and sample)\n");
    free(tables);
    free(tok);
    free(pos);
    free(seq);
    free(slot);
    free(rows);
    free(smp);
    free(ids);
    free(step_tables);
    free(logits);
    model_free(m);
    backend_destroy(b);
}

/* ---- main ---------------------------------------------------------------------------- */

static void usage(FILE *f) {
    fprintf(f,
            "usage: bench_cuda [--ops] [--model DIR] [options]\n"
            "  --ops                  per-op timings (the default when --model is not given)\n"
            "  --model DIR            end-to-end decode on the model in DIR\n"
            "  --device N             CUDA device (default 0)\n"
            "  --context N            prompt tokens per sequence before decoding (default 512)\n"
            "  --steps N              timed decode steps per batch size (default 64)\n"
            "  --batches LIST         decode batch sizes, comma-separated (default 1,8,32,64)\n"
            "  --max-batch-tokens N   tokens per prefill step (default 512)\n"
            "  --min-time S           seconds of timed loop per op figure (default 0.1)\n"
            "  --no-graph             time backend ops and cuBLAS eagerly, not as recorded graphs\n"
            "  --smoke                --ops on small sizes with the shortest loops: checks that every figure\n"
            "                         runs and is right (for the CPU emulator; its times mean nothing)\n"
            "  --quantization Q       --model: weights quantized at load as `nibble serve --quantization Q`\n"
            "  --kv-cache-dtype T     --model: KV cache type (default: the backend's, bf16)\n");
}

static int parse_int(const char *flag, const char *v, int lo, int hi) {
    char *end;
    long x = v ? strtol(v, &end, 10) : 0;
    if (!v || *end || end == v || x < lo || x > hi) bench_die("%s expects an integer in [%d, %d]", flag, lo, hi);
    return (int)x;
}

int main(int argc, char **argv) {
    int ops = 0, min_time_given = 0, prompt = 512, steps = 64, max_batch_tokens = 512, n_batches = 4;
    int batches[MAX_BATCHES] = {1, 8, 32, 64};
    const char *model = NULL, *quant = NULL, *kv = NULL;
    setvbuf(stdout, NULL, _IOLBF, 0);
    log_set_level(LOG_WARN);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--ops")) ops = 1;
        else if (!strcmp(a, "--no-graph")) bench_opts.graphs = 0;
        else if (!strcmp(a, "--smoke")) bench_opts.smoke = 1;
        else if (!strcmp(a, "--model") && v) model = v, i++;
        else if (!strcmp(a, "--quantization") && v) quant = v, i++;
        else if (!strcmp(a, "--kv-cache-dtype") && v) kv = v, i++;
        else if (!strcmp(a, "--device")) bench_opts.device = parse_int(a, v, 0, 1023), i++;
        else if (!strcmp(a, "--context")) prompt = parse_int(a, v, 1, 1 << 20), i++;
        else if (!strcmp(a, "--steps")) steps = parse_int(a, v, 1, 1 << 20), i++;
        else if (!strcmp(a, "--max-batch-tokens")) max_batch_tokens = parse_int(a, v, 1, 1 << 20), i++;
        else if (!strcmp(a, "--min-time") && v) {
            char *end;
            bench_opts.min_time = strtod(v, &end);
            min_time_given = 1;
            if (*end || end == v || !(bench_opts.min_time > 0 && bench_opts.min_time <= 60)) bench_die("--min-time expects seconds in (0, 60]");
            i++;
        } else if (!strcmp(a, "--batches") && v) {
            n_batches = 0;
            for (const char *p = v; *p;) {
                char *end;
                long x = strtol(p, &end, 10);
                if (end == p || x < 1 || x > 4096 || n_batches == MAX_BATCHES || (*end && *end != ','))
                    bench_die("--batches expects up to %d comma-separated sizes in [1, 4096], got '%s'", MAX_BATCHES, v);
                batches[n_batches++] = (int)x;
                p = *end ? end + 1 : end;
            }
            if (!n_batches) bench_die("--batches: no sizes given");
            i++;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            bench_die("unknown or incomplete argument '%s'", a);
        }
    }
    if (!model) ops = 1;
    if (bench_opts.smoke && !min_time_given) bench_opts.min_time = 1e-6; /* the fewest repetitions */
    nb_quant_plan plan;
    nb_err e = {{0}};
    if (quant_plan_parse(quant, kv, &plan, &e)) bench_die("%s", e.msg);

    int n_dev = cuda_device_count();
    if (n_dev == 0) bench_die("no CUDA device found (cuda_device_count() is 0); the GPU benchmarks need one");
    if (bench_opts.device >= n_dev) bench_die("--device %d: %d CUDA device(s) found", bench_opts.device, n_dev);
    char desc[256];
    if (cuda_device_describe(bench_opts.device, desc, sizeof desc)) bench_die("%s", desc);
    printf("device: %s\n", desc);
    CK(cudaSetDevice(bench_opts.device));
    int l2 = 0;
    CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, bench_opts.device));
    bench_opts.l2_bytes = (size_t)l2;
    printf("L2 cache: %.1f MiB; timed loops cycle through copies of their weights (KV caches, expert routings)\n"
           "that together hold twice that, so that no call reads what the last ones left in L2\n",
           l2 / 1048576.0);
    double bw = bench_copy_bandwidth();
    if (ops) bench_ops(bw);
    if (model) bench_decode(model, &plan, batches, n_batches, prompt, steps, max_batch_tokens, bw);
    if (bench_opts.mismatches) bench_die("%d figure(s) above disagree with their reference (MISMATCH)", bench_opts.mismatches);
    return 0;
}
