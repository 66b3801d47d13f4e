/* The quantization setting and the checkpoint's quantization_config. */
#include "engine/model/quant_config.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"

static const struct {
    const char *name;
    nb_dtype t;
} FORMATS[] = {{"none", NB_BF16}, {"bf16", NB_BF16},  {"wint8", NB_WINT8},
               {"wint4", NB_WINT4}, {"wint2", NB_WINT2}, {"block_wise_fp8", NB_FP8_B128}};

int quant_dtype_from_name(const char *name, nb_dtype *out) {
    for (size_t i = 0; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (!strcmp(name, FORMATS[i].name)) {
            *out = FORMATS[i].t;
            return 0;
        }
    return -1;
}

const char *quant_dtype_setting_name(nb_dtype t) {
    for (size_t i = 1; i < sizeof FORMATS / sizeof FORMATS[0]; i++)
        if (FORMATS[i].t == t) return i == 1 ? "none" : FORMATS[i].name;
    return "none";
}

int quant_kv_from_name(const char *name, nb_kv_dtype *out) {
    if (!strcmp(name, "auto") || !strcmp(name, "float32")) *out = NB_KV_F32;
    else if (!strcmp(name, "bf16") || !strcmp(name, "bfloat16")) *out = NB_KV_BF16;
    else if (!strcmp(name, "int8")) *out = NB_KV_INT8;
    else if (!strcmp(name, "float8_e4m3fn") || !strcmp(name, "fp8") || !strcmp(name, "block_wise_fp8")) *out = NB_KV_FP8;
    else return -1;
    return 0;
}

static void plan_init(nb_quant_plan *p) {
    memset(p, 0, sizeof *p);
    snprintf(p->method, sizeof p->method, "none");
    p->dense = p->moe = NB_BF16;
    p->kv = NB_KV_F32;
    p->group = 128;
}

static const char *METHODS = "none, wint8, wint4, wint2, block_wise_fp8, mix_quant";

/* A method name: one format for every linear layer, or mix_quant. */
static int apply_method(const char *name, nb_quant_plan *p, nb_err *e) {
    nb_dtype t;
    if (!strcmp(name, "mix_quant")) {
        snprintf(p->method, sizeof p->method, "mix_quant");
        return 0;
    }
    if (quant_dtype_from_name(name, &t))
        return nb_errf(e, "quantization '%s' is not known (expected one of %s)", name, METHODS);
    snprintf(p->method, sizeof p->method, "%s", quant_dtype_setting_name(t));
    p->dense = p->moe = t;
    if (t == NB_WINT2) p->group = 64;
    return 0;
}

static int layer_type(const cJSON *v, const char *key, nb_dtype *out, nb_err *e) {
    if (!cJSON_IsString(v)) return nb_errf(e, "quantization: '%s' must be a string", key);
    if (quant_dtype_from_name(v->valuestring, out))
        return nb_errf(e, "quantization: '%s' is '%s'; expected one of none, wint8, wint4, wint2, block_wise_fp8", key,
                       v->valuestring);
    return 0;
}

/* Hugging Face FP8 checkpoints: only the block-wise, dynamic-activation
 * flavour (DeepSeek-V3, Qwen3-FP8) maps onto block_wise_fp8. */
static int apply_hf_fp8(const cJSON *o, nb_quant_plan *p, nb_err *e) {
    const cJSON *bs = cJSON_GetObjectItemCaseSensitive(o, "weight_block_size");
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(o, "activation_scheme");
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "fmt");
    if (!cJSON_IsArray(bs))
        return nb_errf(e, "quantization_config: fp8 without weight_block_size (per-tensor FP8) is not supported");
    if (cJSON_GetArraySize(bs) != 2 || !cJSON_IsNumber(bs->child) || !cJSON_IsNumber(bs->child->next) ||
        bs->child->valuedouble != 128 || bs->child->next->valuedouble != 128)
        return nb_errf(e, "quantization_config: weight_block_size must be [128, 128]");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "dynamic")))
        return nb_errf(e, "quantization_config: activation_scheme must be \"dynamic\"");
    if (fmt && (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "e4m3")))
        return nb_errf(e, "quantization_config: fmt must be \"e4m3\"");
    snprintf(p->method, sizeof p->method, "block_wise_fp8");
    p->dense = p->moe = NB_FP8_B128;
    p->is_quantized = 1;
    return 0;
}

/* strict: every key must be known (a setting typed by a user); checkpoints
 * carry keys of other tools, which are ignored. */
static int plan_from_json(const cJSON *o, int strict, nb_quant_plan *p, nb_err *e) {
    static const char *KNOWN[] = {"quantization", "quant_method", "dense_quant_type", "moe_quant_type",
                                  "kv_cache_quant_type", "is_quantized", "group_size", "weight_block_size",
                                  "activation_scheme", "fmt"};
    for (const cJSON *it = o->child; strict && it; it = it->next) {
        size_t k = 0;
        while (k < sizeof KNOWN / sizeof KNOWN[0] && strcmp(it->string, KNOWN[k])) k++;
        if (k == sizeof KNOWN / sizeof KNOWN[0]) return nb_errf(e, "quantization: unknown key '%s'", it->string);
    }
    const cJSON *qm = cJSON_GetObjectItemCaseSensitive(o, "quant_method");
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(o, "quantization");
    if (qm) {
        if (!cJSON_IsString(qm)) return nb_errf(e, "quantization: 'quant_method' must be a string");
        if (!strcmp(qm->valuestring, "fp8")) return apply_hf_fp8(o, p, e);
        if (strcmp(qm->valuestring, "nibble"))
            return nb_errf(e, "quantization_config: quant_method '%s' is not supported (fp8 with "
                              "weight_block_size [128, 128], or checkpoints written by nibble quantize)",
                           qm->valuestring);
    }
    if (q && (!cJSON_IsString(q) || apply_method(q->valuestring, p, e)))
        return q && !cJSON_IsString(q) ? nb_errf(e, "quantization: 'quantization' must be a string") : -1;
    const cJSON *dense = cJSON_GetObjectItemCaseSensitive(o, "dense_quant_type");
    const cJSON *moe = cJSON_GetObjectItemCaseSensitive(o, "moe_quant_type");
    int mix = !strcmp(p->method, "mix_quant") || (!q && (dense || moe));
    nb_dtype t = NB_BF16;
    if (dense) {
        if (layer_type(dense, "dense_quant_type", &t, e)) return -1;
        if (!mix && t != p->dense)
            return nb_errf(e, "quantization: dense_quant_type %s contradicts quantization %s (use mix_quant)",
                           dense->valuestring, p->method);
        p->dense = t;
    }
    if (moe) {
        if (layer_type(moe, "moe_quant_type", &t, e)) return -1;
        if (!mix && t != p->moe)
            return nb_errf(e, "quantization: moe_quant_type %s contradicts quantization %s (use mix_quant)",
                           moe->valuestring, p->method);
        p->moe = t;
    }
    if (mix) {
        if (!dense && !moe)
            return nb_errf(e, "quantization: mix_quant needs dense_quant_type and/or moe_quant_type");
        snprintf(p->method, sizeof p->method, "mix_quant");
        if (!moe) p->moe = NB_BF16;
        if (p->dense == NB_WINT2 || p->moe == NB_WINT2) p->group = 64;
    }
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(o, "kv_cache_quant_type");
    if (kv && !cJSON_IsNull(kv)) {
        if (!cJSON_IsString(kv) || quant_kv_from_name(kv->valuestring, &p->kv))
            return nb_errf(e, "quantization: kv_cache_quant_type must be bf16, int8 or float8_e4m3fn");
        p->kv_set = 1;
    }
    const cJSON *isq = cJSON_GetObjectItemCaseSensitive(o, "is_quantized");
    if (isq) {
        if (!cJSON_IsBool(isq)) return nb_errf(e, "quantization: 'is_quantized' must be true or false");
        p->is_quantized = cJSON_IsTrue(isq);
    }
    const cJSON *gs = cJSON_GetObjectItemCaseSensitive(o, "group_size");
    if (gs) {
        int want = p->dense == NB_WINT2 ? 64 : 128;
        if (!cJSON_IsNumber(gs) || (gs->valuedouble != want && gs->valuedouble != -1 && gs->valuedouble != 0) ||
            (p->dense == NB_WINT2 && gs->valuedouble != 64))
            return nb_errf(e, "quantization: group_size must be %d%s", want,
                           p->dense == NB_WINT2 ? "" : " or -1 (per channel)");
        p->group = gs->valuedouble > 0 ? (int)gs->valuedouble : 0;
    }
    return 0;
}

int quant_plan_parse(const char *setting, const char *kv_dtype, nb_quant_plan *p, nb_err *e) {
    plan_init(p);
    while (setting && (*setting == ' ' || *setting == '\t')) setting++;
    if (setting && *setting == '{') {
        cJSON *o = cJSON_Parse(setting);
        if (!cJSON_IsObject(o)) {
            cJSON_Delete(o);
            return nb_errf(e, "--quantization: not a valid JSON object: %s", setting);
        }
        int rc = plan_from_json(o, 1, p, e);
        cJSON_Delete(o);
        if (rc) return -1;
    } else if (setting && *setting) {
        if (apply_method(setting, p, e)) return -1;
        if (!strcmp(p->method, "mix_quant"))
            return nb_errf(e, "quantization: mix_quant needs dense_quant_type and/or moe_quant_type (pass a JSON "
                              "object)");
    }
    if (kv_dtype) {
        nb_kv_dtype kv;
        if (quant_kv_from_name(kv_dtype, &kv))
            return nb_errf(e, "--kv-cache-dtype '%s' is not known (expected bf16, int8 or float8_e4m3fn)", kv_dtype);
        if (p->kv_set && kv != p->kv)
            return nb_errf(e, "--kv-cache-dtype %s contradicts kv_cache_quant_type %s", kv_dtype,
                           nb_kv_dtype_name(p->kv));
        p->kv = kv;
        p->kv_set = 1;
    }
    return 0;
}

int quant_plan_resolve(const char *dir, const nb_quant_plan *requested, nb_quant_plan *p, nb_err *e) {
    char *path = util_path_join(dir, "config.json");
    char *text = util_read_file(path, NULL, e);
    free(path);
    if (!text) return -1;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (!qc || cJSON_IsNull(qc)) {
        cJSON_Delete(root);
        *p = *requested;
        return 0;
    }
    plan_init(p);
    int rc = cJSON_IsObject(qc) ? plan_from_json(qc, 0, p, e)
                                : nb_errf(e, "config.json: quantization_config must be an object");
    cJSON_Delete(root);
    if (rc) return -1;
    char a[32], b[32];
    if (strcmp(requested->method, "none") &&
        (strcmp(requested->method, p->method) || requested->dense != p->dense || requested->moe != p->moe))
        log_warn("the checkpoint's quantization_config (%s) wins over the requested quantization (%s)",
                 quant_plan_name(p, a, sizeof a), quant_plan_name(requested, b, sizeof b));
    if (requested->kv_set) {
        if (p->kv_set && p->kv != requested->kv)
            log_warn("the checkpoint's kv_cache_quant_type %s wins over the requested %s", nb_kv_dtype_name(p->kv),
                     nb_kv_dtype_name(requested->kv));
        else
            p->kv = requested->kv, p->kv_set = 1;
    }
    return 0;
}

static const char *bits(nb_dtype t) {
    switch (t) {
    case NB_WINT8: return "8";
    case NB_WINT4: return "4";
    case NB_WINT2: return "2";
    case NB_FP8_B128: return "fp8";
    default: return "16";
    }
}

const char *quant_plan_name(const nb_quant_plan *p, char *buf, size_t n) {
    snprintf(buf, n, "W%sA%sC%s", bits(p->dense), p->dense == NB_FP8_B128 ? "fp8" : "16",
             p->kv == NB_KV_INT8 ? "8" : p->kv == NB_KV_FP8 ? "fp8" : "16");
    return buf;
}

int quant_pick_group(const nb_quant_plan *p, nb_dtype t, int64_t K) {
    if (t == NB_WINT2) return 64;
    if (t != NB_WINT4) return 0;
    int64_t want = p->group > 0 ? p->group : K;
    if (K % want == 0) return (int)want;
    return K % 64 == 0 ? 64 : (int)K;
}
