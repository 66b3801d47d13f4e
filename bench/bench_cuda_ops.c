/* bench_cuda --ops: per-op times of the CUDA backend on Llama-3-8B shapes
 * (what and how: the top of bench/bench_cuda.c). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_cuda.h"
#include "common/util.h"
#include "quant/quant.h"

/* Returns the best cuBLAS TFLOP/s seen (the prefill reference). */
static double bench_matmul(nb_backend *b, double bw) {
    static const int full[] = {1, 8, 32, 64, 512, 4096}, smoke[] = {1, 8, 33, 80};
    const bench_list Ms = BENCH_PICK(full, smoke);
    const nb_backend_ops *o = b->ops;
    const int max_m = bench_list_max(Ms);
    size_t max_mk, max_mn, max_nk;
    bench_shapes_max(max_m, &max_mk, &max_mn, &max_nk);
    gemm_ref r;
    bench_gemm_open(&r, max_mn, max_mk);
    float *x = o->alloc(b, sizeof(float) * max_mk), *out = o->alloc(b, sizeof(float) * max_mn);
    float *hx = xmalloc(sizeof(float) * max_mk), *ha = xmalloc(sizeof(float) * max_mn),
          *hb = xmalloc(sizeof(float) * max_mn);
    uint16_t *hxb = xmalloc(2 * max_mk), *hw = xmalloc(2 * max_nk);
    double best_tflops = 0;

    printf("\nmatmul: nibble ops->matmul (BF16 weights, FP32 activations and output) vs cublasGemmEx\n"
           "(BF16 weights and activations, FP32 output, CUBLAS_COMPUTE_32F, default algorithm); time per call;\n"
           "x cuBLAS = cuBLAS time / nibble time (above 1: nibble faster); weight GB/s and of copy for M <= 64;\n"
           "rel err = max |nibble - cuBLAS| / max |cuBLAS| on the same BF16-exact inputs\n");
    printf("  %-13s %6s %6s %5s %11s %11s %9s %8s %12s %8s %9s\n", "shape", "N", "K", "M", "nibble us", "cuBLAS us",
           "x cuBLAS", "TFLOP/s", "weight GB/s", "of copy", "rel err");
    for (int si = 0; si < BENCH_N_SHAPES; si++) {
        const bench_shape sh = bench_shape_at(si);
        const int N = sh.N, K = sh.K;
        size_t nk = (size_t)N * K, mk = (size_t)max_m * K;
        bench_fill_bf16_exact(NULL, hw, nk, 0.035f); /* about the spread of N(0, 0.02) */
        bench_fill_bf16_exact(hx, hxb, mk, 1.0f);
        int n_rot;
        nb_weight hwt = {.dtype = NB_BF16, .rows = N, .cols = K, .data = hw}, *w = bench_weight_copies(b, &hwt, &n_rot);
        bench_gemm_upload(&r, hw, nk, hxb, mk);
        o->upload(b, x, hx, sizeof(float) * mk);
        for (int mi = 0; mi < Ms.n; mi++) {
            int M = Ms.v[mi];
            size_t mn = (size_t)M * N;
            r.M = M, r.N = N, r.K = K;
            /* correctness of what is timed */
            o->matmul(b, out, x, &w[0], M);
            o->download(b, ha, out, sizeof(float) * mn);
            CKB(bench_gemm_run(&r, 0));
            CK(cudaMemcpyAsync(hb, r.c, sizeof(float) * mn, cudaMemcpyDeviceToHost, r.st));
            CK(cudaStreamSynchronize(r.st));
            double rel = bench_rel_err(ha, hb, mn);

            op_call c = {.kind = K_MATMUL, .b = b, .out = out, .x = x, .w = w, .n_rot = n_rot, .n = M};
            double tn = bench_time_op(&c, 1), tc = bench_time_gemm(&r);
            double flops = 2.0 * M * (double)N * K, wbytes = 2.0 * (double)nk;
            if (flops / tc / 1e12 > best_tflops) best_tflops = flops / tc / 1e12;
            printf("  %-13s %6d %6d %5d %11.2f %11.2f %9.2f %8.1f", sh.name, N, K, M, tn * 1e6, tc * 1e6, tc / tn,
                   flops / tn / 1e12);
            if (M <= 64) printf(" %12.1f %8.2f", wbytes / tn / 1e9, wbytes / tn / bw);
            else printf(" %12s %8s", "-", "-");
            printf(" %9.1e%s\n", rel, bench_check(rel, 1e-2));
        }
        bench_weight_copies_free(b, w, n_rot);
    }
    printf("  best cuBLAS rate above: %.1f TFLOP/s\n", best_tflops);
    o->free(b, x);
    o->free(b, out);
    free(hx);
    free(ha);
    free(hb);
    free(hxb);
    free(hw);
    bench_gemm_close(&r);
    return best_tflops;
}

static void bench_attention(nb_backend *b, double bw, double gemm_tflops) {
    const nb_backend_ops *o = b->ops;
    nb_attn_shape s = {N_HEADS, N_KV, HEAD_DIM, 1.0f / sqrtf((float)HEAD_DIM), o->kv_default, 0, 0};
    size_t qd = (size_t)N_HEADS * HEAD_DIM, blk = nb_kv_block_bytes(s.kv_dtype, N_KV, HEAD_DIM),
           tokb = bench_kv_token_bytes(&s);
    static const int ctx_full[] = {1024, 4096}, ctx_smoke[] = {40, 300}, batch_full[] = {1, 32, 64},
                     batch_smoke[] = {1, 3}, prefill_full[] = {512, 4096}, prefill_smoke[] = {64, 130};
    const bench_list ctxs = BENCH_PICK(ctx_full, ctx_smoke), batches = BENCH_PICK(batch_full, batch_smoke),
                     prefills = BENCH_PICK(prefill_full, prefill_smoke);

    printf("\nattention decode: one query token per sequence, %d heads / %d KV heads, head_dim %d, KV cache %s;\n"
           "GB/s = K and V bytes read / time\n", N_HEADS, N_KV, HEAD_DIM, nb_kv_dtype_name(s.kv_dtype));
    printf("  %-34s %13s %14s %8s\n", "batch x context", "time", "KV read", "of copy");
    for (int ci = 0; ci < ctxs.n; ci++)
        for (int bi = 0; bi < batches.n; bi++) {
            int B = batches.v[bi], C = ctxs.v[ci];
            bench_batch bb;
            bench_batch_decode(&bb, B, C);
            int blocks = B * bb.b.max_blocks;
            /* n_rot caches of every sequence's blocks, cycled through: a
             * decode step reads each layer's cache once */
            const size_t cache = blk * (size_t)blocks;
            const int n_rot = bench_copies(2.0 * (double)cache);
            char *kc = o->alloc(b, cache * n_rot), *vc = o->alloc(b, cache * n_rot);
            for (int i = 0; i < n_rot; i++) bench_fill_kv(b, kc + i * cache, vc + i * cache, blocks * NB_KV_BLOCK_SIZE, &s);
            float *q = bench_dev_random(b, (size_t)B * qd, 1.0f), *out = o->alloc(b, sizeof(float) * B * qd);
            o->set_batch(b, &bb.b);
            op_call c = {.kind = K_ATTENTION, .b = b, .out = out, .x = q, .kc = kc, .vc = vc, .kv_stride = cache,
                         .n_rot = n_rot, .s = s};
            double t = bench_time_op(&c, 1);
            char what[64];
            snprintf(what, sizeof what, "%d x %d", B, C);
            bench_print_bw(what, t, 2.0 * (double)B * C * (double)tokb, bw);
            o->free(b, q);
            o->free(b, out);
            o->free(b, kc);
            o->free(b, vc);
            bench_batch_free(&bb);
        }

    printf("\nattention prefill: one sequence, causal; FLOPs = 4 * heads * head_dim * T (T + 1) / 2;\n"
           "of cuBLAS = TFLOP/s / the best cublasGemmEx TFLOP/s measured above\n");
    printf("  %-34s %13s %14s %8s\n", "tokens", "time", "rate", "of cuBLAS");
    for (int pi = 0; pi < prefills.n; pi++) {
        int T = prefills.v[pi];
        bench_batch bb;
        bench_batch_prefill(&bb, T);
        void *kc = o->alloc(b, blk * (size_t)bb.b.max_blocks), *vc = o->alloc(b, blk * (size_t)bb.b.max_blocks);
        bench_fill_kv(b, kc, vc, T, &s);
        float *q = bench_dev_random(b, (size_t)T * qd, 1.0f), *out = o->alloc(b, sizeof(float) * T * qd);
        o->set_batch(b, &bb.b);
        op_call c = {.kind = K_ATTENTION, .b = b, .out = out, .x = q, .kc = kc, .vc = vc, .s = s};
        double t = bench_time_op(&c, 0);
        double flops = 4.0 * N_HEADS * HEAD_DIM * (double)T * (T + 1) / 2.0, tf = flops / t / 1e12;
        char what[64];
        snprintf(what, sizeof what, "%d", T);
        printf("  %-34s %10.2f us %6.2f TFLOP/s", what, t * 1e6, tf);
        if (gemm_tflops > 0) printf(" %8.3f", tf / gemm_tflops);
        printf("\n");
        o->free(b, q);
        o->free(b, out);
        o->free(b, kc);
        o->free(b, vc);
        bench_batch_free(&bb);
    }
}

static void bench_small_ops(nb_backend *b, double bw) {
    const nb_backend_ops *o = b->ops;
    static const int full[] = {1, 64, 4096}, smoke[] = {1, 33};
    const bench_list rows = BENCH_PICK(full, smoke);
    const int max_n = bench_list_max(rows), hidden = bench_dim(HIDDEN), inter = bench_dim(INTER);
    nb_attn_shape s = {N_HEADS, N_KV, HEAD_DIM, 1.0f / sqrtf((float)HEAD_DIM), o->kv_default, 0, 0};
    size_t qd = (size_t)N_HEADS * HEAD_DIM, kvd = (size_t)N_KV * HEAD_DIM;

    uint16_t ones[HIDDEN];
    for (int i = 0; i < hidden; i++) ones[i] = f32_to_bf16(1.0f);
    nb_weight norm = {.dtype = NB_BF16, .rows = 1, .cols = hidden, .data = o->weight_load(b, ones, 2 * (size_t)hidden)};
    float inv[HEAD_DIM / 2];
    for (int i = 0; i < HEAD_DIM / 2; i++) inv[i] = (float)(1.0 / pow(ROPE_THETA, 2.0 * i / HEAD_DIM));
    float *inv_dev = o->alloc(b, sizeof inv);
    o->upload(b, inv_dev, inv, sizeof inv);

    size_t big = (size_t)max_n * (inter > (int)qd ? (size_t)inter : qd); /* silu_mul's and rope's rows */
    float *a = bench_dev_random(b, big, 1.0f), *c2 = bench_dev_random(b, big, 1.0f), *out = o->alloc(b, sizeof(float) * big);
    size_t blk = nb_kv_block_bytes(s.kv_dtype, N_KV, HEAD_DIM),
           n_blocks = (size_t)(max_n + NB_KV_BLOCK_SIZE - 1) / NB_KV_BLOCK_SIZE;
    void *kc = o->alloc(b, blk * n_blocks), *vc = o->alloc(b, blk * n_blocks);

    printf("\nelementwise ops (FP32 activations, hidden %d, intermediate %d); GB/s = bytes read + written / time\n",
           hidden, inter);
    printf("  %-34s %13s %14s %8s\n", "op, rows (tokens)", "time", "traffic", "of copy");
    char what[64];
    for (int i = 0; i < rows.n; i++) {
        int n = rows.v[i];
        op_call c = {.kind = K_RMSNORM, .b = b, .out = out, .x = a, .w = &norm, .n = n};
        snprintf(what, sizeof what, "rmsnorm %d", n);
        bench_print_bw(what, bench_time_op(&c, 1), 8.0 * n * hidden + 2.0 * hidden, bw);
    }
    for (int i = 0; i < rows.n; i++) {
        int n = rows.v[i];
        /* x += delta each call: a tiny delta keeps x bounded over the loop */
        float *delta = bench_dev_random(b, (size_t)n * hidden, 1e-6f);
        op_call c = {.kind = K_ADD_RMSNORM, .b = b, .out = out, .x = a, .y = delta, .w = &norm, .n = n};
        snprintf(what, sizeof what, "add_rmsnorm %d", n);
        bench_print_bw(what, bench_time_op(&c, 1), 16.0 * n * hidden + 2.0 * hidden, bw);
        o->free(b, delta);
    }
    for (int i = 0; i < rows.n; i++) {
        int n = rows.v[i];
        bench_batch bb;
        bench_batch_prefill(&bb, n);
        o->set_batch(b, &bb.b);
        op_call c = {.kind = K_ROPE, .b = b, .x = a, .heads = N_HEADS, .inv_freq = inv_dev};
        snprintf(what, sizeof what, "rope q (%d heads) %d", N_HEADS, n);
        bench_print_bw(what, bench_time_op(&c, 1), 8.0 * n * qd, bw);
        bench_batch_free(&bb);
    }
    for (int i = 0; i < rows.n; i++) {
        int n = rows.v[i];
        op_call c = {.kind = K_SILU_MUL, .b = b, .out = out, .x = a, .y = c2, .n = n, .cols = inter};
        snprintf(what, sizeof what, "silu_mul %d x %d", n, inter);
        bench_print_bw(what, bench_time_op(&c, 1), 12.0 * n * inter, bw);
    }
    for (int i = 0; i < rows.n; i++) {
        int n = rows.v[i];
        bench_batch bb;
        bench_batch_prefill(&bb, n);
        o->set_batch(b, &bb.b);
        op_call c = {.kind = K_KV_WRITE, .b = b, .x = a, .y = c2, .kc = kc, .vc = vc, .s = s};
        snprintf(what, sizeof what, "kv_write (%s) %d", nb_kv_dtype_name(s.kv_dtype), n);
        bench_print_bw(what, bench_time_op(&c, 1), 2.0 * n * (4.0 * kvd + (double)bench_kv_token_bytes(&s)), bw);
        bench_batch_free(&bb);
    }
    o->free(b, a);
    o->free(b, c2);
    o->free(b, out);
    o->free(b, kc);
    o->free(b, vc);
    o->free(b, inv_dev);
    o->weight_free(b, norm.data);
}

void bench_ops(double bw) {
    nb_err e;
    memset(&e, 0, sizeof e);
    nb_backend *b = cuda_backend_create(bench_opts.device, &e);
    if (!b) bench_die("CUDA backend: %s", e.msg);
    printf("\nbackend ops, Llama-3-8B shapes%s; %s\n", bench_opts.smoke ? " (--smoke: widths / 16, short lists)" : "",
           bench_opts.graphs ? "timed loops recorded as graphs (ops->graph_begin) and replayed, except prefill attention"
                    : "timed loops issued eagerly (--no-graph)");
    double tf = bench_matmul(b, bw);
    bench_quant_matmul(b, bw);
    bench_attention(b, bw, tf);
    bench_small_ops(b, bw);
    bench_moe_experts(b, bw); /* last: the newest, not yet run on a device */
    backend_destroy(b);
}
