#include "engine/model/config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"

static const struct {
    const char *name;
    nb_arch arch;
} arch_table[] = {
    {"LlamaForCausalLM", ARCH_LLAMA},     {"MistralForCausalLM", ARCH_MISTRAL},
    {"Qwen2ForCausalLM", ARCH_QWEN2},     {"Qwen3ForCausalLM", ARCH_QWEN3},
    {"Ernie4_5_ForCausalLM", ARCH_ERNIE45}, {"Ernie4_5ForCausalLM", ARCH_ERNIE45},
    {"Qwen3MoeForCausalLM", ARCH_QWEN3_MOE}, {"MixtralForCausalLM", ARCH_MIXTRAL},
    {"Ernie4_5_MoeForCausalLM", ARCH_ERNIE45_MOE},
};

const char *config_arch_label(nb_arch a) {
    for (size_t i = 0; i < sizeof arch_table / sizeof arch_table[0]; i++)
        if (arch_table[i].arch == a) return arch_table[i].name;
    return "?";
}

/* Reads an integer field. Absent (or JSON null) gives def; present but not a
 * non-negative integer is an error. */
static int get_int(const cJSON *o, const char *key, int def, int *out, const char *path, nb_err *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble > 1e9)
        return nb_errf(e, "%s: field \"%s\" must be a non-negative integer", path, key);
    *out = (int)v->valuedouble;
    return 0;
}

static int get_float(const cJSON *o, const char *key, float def, float *out, const char *path,
                     nb_err *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble))
        return nb_errf(e, "%s: field \"%s\" must be a number", path, key);
    *out = (float)v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *o, const char *key, int def, int *out, const char *path, nb_err *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return 0;
    }
    if (!cJSON_IsBool(v)) return nb_errf(e, "%s: field \"%s\" must be true or false", path, key);
    *out = cJSON_IsTrue(v);
    return 0;
}

static int require_positive(int v, const char *key, const char *path, nb_err *e) {
    if (v <= 0) return nb_errf(e, "%s: field \"%s\" is missing or not positive", path, key);
    return 0;
}

/* eos_token_id may be an int or a list of ints. */
static int parse_eos(const cJSON *o, nb_model_config *c, const char *path, nb_err *e) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, "eos_token_id");
    if (!v || cJSON_IsNull(v)) return 0;
    const cJSON *items = cJSON_IsArray(v) ? v : NULL;
    int n = items ? cJSON_GetArraySize(v) : 1;
    if (n > NB_MAX_EOS) return nb_errf(e, "%s: eos_token_id has more than %d entries", path, NB_MAX_EOS);
    c->n_eos = 0;
    for (int i = 0; i < n; i++) {
        const cJSON *x = items ? cJSON_GetArrayItem(v, i) : v;
        if (!cJSON_IsNumber(x) || x->valuedouble < 0 || x->valuedouble != floor(x->valuedouble))
            return nb_errf(e, "%s: eos_token_id must be an integer or a list of integers", path);
        c->eos_token_ids[c->n_eos++] = (int32_t)x->valuedouble;
    }
    return 0;
}

static int parse_rope(const cJSON *root, nb_model_config *c, const char *path, nb_err *e) {
    /* transformers 5 writes rope_parameters (theta inside); older files have
     * rope_theta and rope_scaling at the top level. */
    const cJSON *params = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (params && !cJSON_IsNull(params) && !cJSON_IsObject(params))
        return nb_errf(e, "%s: rope_parameters must be an object", path);
    if (scaling && !cJSON_IsNull(scaling) && !cJSON_IsObject(scaling))
        return nb_errf(e, "%s: rope_scaling must be an object or null", path);
    if (get_float(root, "rope_theta", 10000.0f, &c->rope_theta, path, e)) return -1;
    const cJSON *sc = cJSON_IsObject(scaling) ? scaling : NULL;
    if (cJSON_IsObject(params)) {
        if (get_float(params, "rope_theta", c->rope_theta, &c->rope_theta, path, e)) return -1;
        if (!sc) sc = params;
    }
    if (c->rope_theta <= 0) return nb_errf(e, "%s: rope_theta must be positive", path);
    c->rope_type = ROPE_DEFAULT;
    if (!sc) return 0;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(sc, "rope_type");
    if (!t) t = cJSON_GetObjectItemCaseSensitive(sc, "type");
    const char *type = cJSON_IsString(t) ? t->valuestring : "default";
    if (!strcmp(type, "default")) return 0;
    if (get_float(sc, "factor", 1.0f, &c->rope_factor, path, e)) return -1;
    if (c->rope_factor <= 0) return nb_errf(e, "%s: rope scaling factor must be positive", path);
    if (!strcmp(type, "linear")) {
        c->rope_type = ROPE_LINEAR;
        return 0;
    }
    if (!strcmp(type, "llama3")) {
        c->rope_type = ROPE_LLAMA3;
        if (get_float(sc, "low_freq_factor", 1.0f, &c->rope_low_freq_factor, path, e) ||
            get_float(sc, "high_freq_factor", 4.0f, &c->rope_high_freq_factor, path, e) ||
            get_int(sc, "original_max_position_embeddings", 8192, &c->rope_orig_max_position, path, e))
            return -1;
        if (c->rope_high_freq_factor <= c->rope_low_freq_factor)
            return nb_errf(e, "%s: llama3 rope needs high_freq_factor > low_freq_factor", path);
        return 0;
    }
    return nb_errf(e, "%s: unsupported rope scaling type \"%s\"", path, type);
}

/* The first of the keys that is present, or NULL. */
static const char *first_key(const cJSON *o, const char *const *keys) {
    for (; *keys; keys++)
        if (cJSON_GetObjectItemCaseSensitive(o, *keys)) return *keys;
    return NULL;
}

static int get_int_any(const cJSON *o, const char *const *keys, int def, int *out, const char *path, nb_err *e) {
    const char *k = first_key(o, keys);
    if (!k) {
        *out = def;
        return 0;
    }
    return get_int(o, k, def, out, path, e);
}

/* The mixture-of-experts fields of the MoE architectures, in each family's
 * names (transformers 5 writes num_local_experts where Qwen's hub configs
 * have num_experts). */
static int parse_moe(const cJSON *root, nb_model_config *c, const char *path, nb_err *e) {
    nb_moe_config *m = &c->moe;
    static const char *const EXPERTS[] = {"num_experts", "num_local_experts", "moe_num_experts", NULL};
    static const char *const USED[] = {"num_experts_per_tok", "moe_k", NULL};
    static const char *const FFN[] = {"moe_intermediate_size", NULL};
    m->step = 1, m->first = 0, m->last = c->n_layers - 1;
    switch (c->arch) {
    case ARCH_QWEN3_MOE:
    case ARCH_MIXTRAL:
    case ARCH_ERNIE45_MOE: break;
    default: return 0;
    }
    if (get_int_any(root, EXPERTS, 0, &m->n_experts, path, e) || get_int_any(root, USED, 0, &m->n_used, path, e) ||
        get_int_any(root, FFN, c->intermediate_size, &m->ffn, path, e))
        return -1;
    if (c->arch == ARCH_MIXTRAL) m->ffn = c->intermediate_size;
    if (require_positive(m->n_experts, "num_experts", path, e) || require_positive(m->n_used, "num_experts_per_tok", path, e) ||
        require_positive(m->ffn, "moe_intermediate_size", path, e))
        return -1;
    if (m->n_used > m->n_experts)
        return nb_errf(e, "%s: num_experts_per_tok %d is more than the %d experts", path, m->n_used, m->n_experts);
    if (m->n_experts > NB_MAX_EXPERTS || m->n_used > NB_MAX_EXPERTS_USED)
        return nb_errf(e, "%s: %d experts, %d per token: at most %d and %d are supported", path, m->n_experts,
                       m->n_used, NB_MAX_EXPERTS, NB_MAX_EXPERTS_USED);
    switch (c->arch) {
    case ARCH_QWEN3_MOE: {
        if (get_bool(root, "norm_topk_prob", 0, &m->norm, path, e) ||
            get_int(root, "decoder_sparse_step", 1, &m->step, path, e))
            return -1;
        const cJSON *d = cJSON_GetObjectItemCaseSensitive(root, "mlp_only_layers");
        if (d && !cJSON_IsNull(d)) {
            if (!cJSON_IsArray(d) || cJSON_GetArraySize(d) > NB_MAX_MLP_ONLY)
                return nb_errf(e, "%s: mlp_only_layers must be a list of at most %d layer indices", path,
                               NB_MAX_MLP_ONLY);
            const cJSON *it;
            cJSON_ArrayForEach(it, d) {
                if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble != floor(it->valuedouble))
                    return nb_errf(e, "%s: mlp_only_layers must hold layer indices", path);
                m->dense[m->n_dense++] = (int)it->valuedouble;
            }
        }
        break;
    }
    case ARCH_MIXTRAL:
        m->norm = 1;
        m->block = "block_sparse_moe", m->proj[0] = "w1", m->proj[1] = "w3", m->proj[2] = "w2";
        break;
    default: { /* ERNIE 4.5 */
        int n_shared = 0;
        m->norm = 1, m->score_bias = 1;
        if (get_int(root, "moe_num_shared_experts", 0, &n_shared, path, e) ||
            get_int(root, "moe_layer_interval", 1, &m->step, path, e) ||
            get_int(root, "moe_layer_start_index", 0, &m->first, path, e) ||
            get_int(root, "moe_layer_end_index", c->n_layers - 1, &m->last, path, e) ||
            get_float(root, "moe_norm_min", 1e-12f, &m->norm_min, path, e))
            return -1;
        m->shared_ffn = n_shared * m->ffn;
        break;
    }
    }
    if (!m->block) m->block = "mlp", m->proj[0] = "gate_proj", m->proj[1] = "up_proj", m->proj[2] = "down_proj";
    if (m->step < 1) return nb_errf(e, "%s: the MoE layer interval must be at least 1", path);
    return 0;
}

int config_layer_is_moe(const nb_model_config *c, int i) {
    const nb_moe_config *m = &c->moe;
    if (!m->n_experts || (i + 1) % m->step || i < m->first || i > m->last) return 0;
    for (int j = 0; j < m->n_dense; j++)
        if (m->dense[j] == i) return 0;
    return 1;
}

int config_parse(const char *json, const char *path, nb_model_config *c, nb_err *e) {
    memset(c, 0, sizeof *c);
    c->bos_token_id = -1;
    c->gen_temperature = c->gen_top_p = -1;
    c->gen_top_k = -1;
    cJSON *root = cJSON_Parse(json);
    if (!root) return nb_errf(e, "%s: not valid JSON", path);
    int rc = -1;
    if (!cJSON_IsObject(root)) {
        nb_errf(e, "%s: top level must be a JSON object", path);
        goto out;
    }
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(root, "architectures");
    const cJSON *a0 = cJSON_IsArray(archs) ? cJSON_GetArrayItem(archs, 0) : NULL;
    if (!cJSON_IsString(a0)) {
        nb_errf(e, "%s: \"architectures\" must be a list naming the model class", path);
        goto out;
    }
    snprintf(c->arch_name, sizeof c->arch_name, "%s", a0->valuestring);
    size_t i, n_arch = sizeof arch_table / sizeof arch_table[0];
    for (i = 0; i < n_arch && strcmp(arch_table[i].name, a0->valuestring); i++) {}
    if (i == n_arch) {
        nb_errf(e, "%s: unsupported architecture \"%s\"", path, a0->valuestring);
        goto out;
    }
    c->arch = arch_table[i].arch;

    if (get_int(root, "vocab_size", 0, &c->vocab_size, path, e) ||
        get_int(root, "hidden_size", 0, &c->hidden_size, path, e) ||
        get_int(root, "intermediate_size", 0, &c->intermediate_size, path, e) ||
        get_int(root, "num_hidden_layers", 0, &c->n_layers, path, e) ||
        get_int(root, "num_attention_heads", 0, &c->n_heads, path, e))
        goto out;
    if (require_positive(c->vocab_size, "vocab_size", path, e) ||
        require_positive(c->hidden_size, "hidden_size", path, e) ||
        require_positive(c->intermediate_size, "intermediate_size", path, e) ||
        require_positive(c->n_layers, "num_hidden_layers", path, e) ||
        require_positive(c->n_heads, "num_attention_heads", path, e))
        goto out;
    if (get_int(root, "num_key_value_heads", c->n_heads, &c->n_kv_heads, path, e) ||
        get_int(root, "head_dim", c->hidden_size / c->n_heads, &c->head_dim, path, e) ||
        get_int(root, "max_position_embeddings", 4096, &c->max_position, path, e) ||
        get_float(root, "rms_norm_eps", 1e-6f, &c->rms_eps, path, e))
        goto out;
    if (require_positive(c->n_kv_heads, "num_key_value_heads", path, e) ||
        require_positive(c->head_dim, "head_dim", path, e) ||
        require_positive(c->max_position, "max_position_embeddings", path, e))
        goto out;
    if (c->n_heads % c->n_kv_heads) {
        nb_errf(e, "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)", path,
                c->n_heads, c->n_kv_heads);
        goto out;
    }
    if (c->head_dim % 2) {
        nb_errf(e, "%s: head_dim %d must be even for rotary embeddings", path, c->head_dim);
        goto out;
    }
    if (!(c->rms_eps > 0)) {
        nb_errf(e, "%s: rms_norm_eps must be positive", path);
        goto out;
    }
    int sliding = 0, use_sliding = 1;
    if (get_bool(root, "tie_word_embeddings", c->arch == ARCH_ERNIE45 || c->arch == ARCH_ERNIE45_MOE,
                 &c->tie_embeddings, path, e) ||
        get_int(root, "sliding_window", 0, &sliding, path, e) ||
        get_bool(root, "use_sliding_window", c->arch == ARCH_MISTRAL || c->arch == ARCH_MIXTRAL, &use_sliding, path, e))
        goto out;
    if (sliding > 0 && use_sliding && sliding < c->max_position) {
        /* Windowed attention is not implemented: within the window it equals
         * full attention, so the context is capped there instead. */
        log_warn("%s: sliding_window %d < max_position_embeddings %d; context capped at %d", path,
                 sliding, c->max_position, sliding);
        c->max_position = sliding;
    }

    int attn_bias = 0, use_bias = 0;
    if (get_bool(root, "attention_bias", 0, &attn_bias, path, e) ||
        get_bool(root, "mlp_bias", 0, &c->mlp_bias, path, e) ||
        get_bool(root, "use_bias", 0, &use_bias, path, e))
        goto out;
    switch (c->arch) {
    case ARCH_QWEN2:
        c->qkv_bias = 1;
        break;
    case ARCH_QWEN3:
    case ARCH_QWEN3_MOE:
        c->qk_norm = 1;
        c->qkv_bias = c->o_bias = attn_bias;
        break;
    case ARCH_ERNIE45:
    case ARCH_ERNIE45_MOE:
        c->rope_interleaved = 1;
        c->qkv_bias = c->o_bias = c->mlp_bias = use_bias;
        break;
    case ARCH_LLAMA:
    case ARCH_MISTRAL:
    case ARCH_MIXTRAL:
        c->qkv_bias = c->o_bias = attn_bias;
        break;
    }
    if (parse_rope(root, c, path, e) || parse_moe(root, c, path, e)) goto out;

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(root, "torch_dtype");
    if (!cJSON_IsString(dt)) dt = cJSON_GetObjectItemCaseSensitive(root, "dtype");
    snprintf(c->dtype, sizeof c->dtype, "%s", cJSON_IsString(dt) ? dt->valuestring : "unknown");
    int bos = -1;
    const cJSON *bv = cJSON_GetObjectItemCaseSensitive(root, "bos_token_id");
    if (cJSON_IsNumber(bv) && bv->valuedouble >= 0) bos = (int)bv->valuedouble;
    c->bos_token_id = bos;
    if (parse_eos(root, c, path, e)) goto out;
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

/* generation_config.json overrides the token ids and gives sampling defaults. */
static int parse_generation(const char *dir, nb_model_config *c, nb_err *e) {
    char *path = util_path_join(dir, "generation_config.json");
    int rc = 0;
    if (!util_file_exists(path)) goto out;
    char *text = util_read_file(path, NULL, e);
    if (!text) {
        rc = -1;
        goto out;
    }
    cJSON *g = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(g)) {
        cJSON_Delete(g);
        rc = nb_errf(e, "%s: not a valid JSON object", path);
        goto out;
    }
    const cJSON *bv = cJSON_GetObjectItemCaseSensitive(g, "bos_token_id");
    if (cJSON_IsNumber(bv) && bv->valuedouble >= 0) c->bos_token_id = (int32_t)bv->valuedouble;
    if (parse_eos(g, c, path, e) || get_float(g, "temperature", -1, &c->gen_temperature, path, e) ||
        get_float(g, "top_p", -1, &c->gen_top_p, path, e) ||
        get_int(g, "top_k", -1, &c->gen_top_k, path, e))
        rc = -1;
    cJSON_Delete(g);
out:
    free(path);
    return rc;
}

int config_load(const char *dir, nb_model_config *c, nb_err *e) {
    char *path = util_path_join(dir, "config.json");
    char *text = util_read_file(path, NULL, e);
    int rc = -1;
    if (text && config_parse(text, path, c, e) == 0) rc = parse_generation(dir, c, e);
    free(text);
    free(path);
    return rc;
}

void config_rope_inv_freq(const nb_model_config *c, float *inv_freq) {
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        /* float32 throughout, as torch computes base ** (arange/dim). */
        float expo = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / powf(c->rope_theta, expo);
        if (c->rope_type == ROPE_LINEAR) {
            f /= c->rope_factor;
        } else if (c->rope_type == ROPE_LLAMA3) {
            float old = (float)c->rope_orig_max_position;
            float low_wl = old / c->rope_low_freq_factor, high_wl = old / c->rope_high_freq_factor;
            float wl = 2.0f * (float)M_PI / f;
            if (wl > low_wl) {
                f = f / c->rope_factor;
            } else if (!(wl < high_wl)) {
                float s = (old / wl - c->rope_low_freq_factor) /
                          (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1 - s) * f / c->rope_factor + s * f;
            }
        }
        inv_freq[i] = f;
    }
}

int config_is_eos(const nb_model_config *c, int32_t id) {
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_token_ids[i] == id) return 1;
    return 0;
}
