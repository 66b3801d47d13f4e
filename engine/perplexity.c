#include "engine/perplexity.h"

#include <math.h>
#include <stdlib.h>

#include "common/util.h"

int perplexity_run(nb_model *m, const int32_t *ids, size_t n, int ctx, double *ppl, size_t *n_scored, nb_err *e) {
    int V = model_config(m)->vocab_size, max_t = model_max_batch_tokens(m), blocks = model_num_kv_blocks(m);
    if (ctx < 2 || (size_t)ctx > (size_t)blocks * NB_KV_BLOCK_SIZE || ctx > model_config(m)->max_position)
        return nb_errf(e, "perplexity window %d needs 2..%d tokens (KV blocks and context)", ctx,
                       blocks * NB_KV_BLOCK_SIZE);
    int32_t *pos = xmalloc(sizeof(int32_t) * (size_t)max_t), *seq = xcalloc((size_t)max_t, sizeof(int32_t));
    int32_t *rows = xmalloc(sizeof(int32_t) * (size_t)max_t), *table = xmalloc(sizeof(int32_t) * (size_t)blocks);
    float *logits = xmalloc(sizeof(float) * (size_t)max_t * (size_t)V);
    for (int i = 0; i < blocks; i++) table[i] = i;
    for (int i = 0; i < max_t; i++) rows[i] = i;
    double nll = 0;
    size_t scored = 0;
    int rc = 0;
    for (size_t w0 = 0; w0 + 1 < n && !rc; w0 += (size_t)ctx) {
        size_t len = n - w0 < (size_t)ctx ? n - w0 : (size_t)ctx;
        for (size_t c0 = 0; c0 < len && !rc; c0 += (size_t)max_t) {
            int cn = len - c0 < (size_t)max_t ? (int)(len - c0) : max_t;
            for (int t = 0; t < cn; t++) pos[t] = (int32_t)(c0 + (size_t)t);
            nb_batch b = {cn, pos, seq, pos, 1, blocks, table};
            if ((rc = model_forward(m, ids + w0 + c0, &b, rows, cn, logits, e))) break;
            /* row t predicts token c0 + t + 1 of the window */
            for (int t = 0; t < cn && c0 + (size_t)t + 1 < len; t++) {
                const float *l = logits + (size_t)t * V;
                float mx = l[0];
                for (int v = 1; v < V; v++) mx = l[v] > mx ? l[v] : mx;
                double s = 0;
                for (int v = 0; v < V; v++) s += exp((double)l[v] - mx);
                nll += mx + log(s) - l[ids[w0 + c0 + (size_t)t + 1]];
                scored++;
            }
        }
    }
    free(pos), free(seq), free(rows), free(table), free(logits);
    if (rc) return -1;
    if (!scored) return nb_errf(e, "perplexity: no tokens to score");
    *ppl = exp(nll / (double)scored);
    *n_scored = scored;
    return 0;
}
