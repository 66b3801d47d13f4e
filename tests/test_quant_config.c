/* The quantization setting: names, JSON objects, MixQuant layer classes, KV
 * cache types, Hugging Face FP8 configs, the checkpoint's config winning,
 * and one-line errors for unknown or inconsistent settings. */
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/model/quant_config.h"
#include "tests/test.h"

static nb_quant_plan plan(const char *setting, const char *kv, int *rc, nb_err *e) {
    nb_quant_plan p;
    *rc = quant_plan_parse(setting, kv, &p, e);
    return p;
}

static void test_names(void) {
    static const struct {
        const char *s;
        nb_dtype dense;
        const char *name;
    } cases[] = {{NULL, NB_BF16, "W16A16C16"},          {"none", NB_BF16, "W16A16C16"},
                 {"wint8", NB_WINT8, "W8A16C16"},       {"wint4", NB_WINT4, "W4A16C16"},
                 {"wint2", NB_WINT2, "W2A16C16"},       {"block_wise_fp8", NB_FP8_B128, "Wfp8Afp8C16"},
                 {"{\"quantization\": \"wint4\"}", NB_WINT4, "W4A16C16"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc;
        nb_err e = {{0}};
        nb_quant_plan p = plan(cases[i].s, NULL, &rc, &e);
        char buf[32];
        CHECK(rc == 0 && p.dense == cases[i].dense && p.moe == cases[i].dense &&
                  !strcmp(quant_plan_name(&p, buf, sizeof buf), cases[i].name),
              "%s -> rc %d dense %d name %s (%s)", cases[i].s ? cases[i].s : "NULL", rc, p.dense, buf, e.msg);
    }
    int rc;
    nb_err e;
    nb_quant_plan p = plan("wint2", NULL, &rc, &e);
    CHECK(p.group == 64, "wint2 group %d", p.group);
    p = plan("{\"quantization\": \"wint4\", \"group_size\": -1}", NULL, &rc, &e);
    CHECK(rc == 0 && p.group == 0, "per-channel wint4: rc %d group %d", rc, p.group);
}

static void test_mix_and_kv(void) {
    int rc;
    nb_err e = {{0}};
    nb_quant_plan p = plan("{\"quantization\": \"mix_quant\", \"dense_quant_type\": \"wint8\", \"moe_quant_type\": "
                           "\"wint4\", \"kv_cache_quant_type\": \"int8\"}",
                           NULL, &rc, &e);
    char buf[32];
    CHECK(rc == 0 && p.dense == NB_WINT8 && p.moe == NB_WINT4 && p.kv == NB_KV_INT8 && !strcmp(p.method, "mix_quant") &&
              !strcmp(quant_plan_name(&p, buf, sizeof buf), "W8A16C8"),
          "mix_quant: rc %d %s dense %d moe %d kv %d (%s)", rc, p.method, p.dense, p.moe, p.kv, e.msg);
    p = plan("{\"dense_quant_type\": \"wint4\"}", "float8_e4m3fn", &rc, &e);
    CHECK(rc == 0 && p.dense == NB_WINT4 && p.moe == NB_BF16 && p.kv == NB_KV_FP8 &&
              !strcmp(quant_plan_name(&p, buf, sizeof buf), "W4A16Cfp8"),
          "dense-only object is mix_quant: rc %d dense %d moe %d kv %d", rc, p.dense, p.moe, p.kv);
    static const char *kvs[][2] = {{"int8", "int8"}, {"fp8", "float8_e4m3fn"}, {"block_wise_fp8", "float8_e4m3fn"},
                                   {"bf16", "bf16"}, {"auto", "float32"}};
    for (size_t i = 0; i < sizeof kvs / sizeof kvs[0]; i++) {
        p = plan(NULL, kvs[i][0], &rc, &e);
        CHECK(rc == 0 && !strcmp(nb_kv_dtype_name(p.kv), kvs[i][1]), "--kv-cache-dtype %s -> %s", kvs[i][0],
              nb_kv_dtype_name(p.kv));
    }
    p = plan("{\"quantization\": \"wint8\", \"kv_cache_quant_type\": \"int8\"}", "int8", &rc, &e);
    CHECK(rc == 0 && p.kv == NB_KV_INT8, "agreeing kv settings are fine");
}

static void test_errors(void) {
    static const char *bad[][3] = {
        {"wint3", NULL, "not known"},
        {"{\"quantization\": \"wint8\"", NULL, "not a valid JSON"},
        {"{\"quantization\": \"wint8\", \"bogus\": 1}", NULL, "unknown key"},
        {"{\"quantization\": \"wint8\", \"dense_quant_type\": \"wint4\"}", NULL, "contradicts"},
        {"{\"quantization\": \"mix_quant\"}", NULL, "needs dense_quant_type"},
        {"mix_quant", NULL, "needs dense_quant_type"},
        {"{\"quantization\": \"mix_quant\", \"dense_quant_type\": \"int3\"}", NULL, "dense_quant_type"},
        {"{\"kv_cache_quant_type\": \"int4\"}", NULL, "kv_cache_quant_type"},
        {NULL, "int4", "--kv-cache-dtype"},
        {"{\"kv_cache_quant_type\": \"int8\"}", "float8_e4m3fn", "contradicts"},
        {"{\"quant_method\": \"awq\"}", NULL, "not supported"},
        {"{\"quant_method\": \"fp8\"}", NULL, "per-tensor"},
        {"{\"quant_method\": \"fp8\", \"weight_block_size\": [64, 64]}", NULL, "[128, 128]"},
        {"{\"quant_method\": \"fp8\", \"weight_block_size\": [128, 128], \"activation_scheme\": \"static\"}", NULL,
         "dynamic"},
        {"{\"quantization\": \"wint4\", \"group_size\": 32}", NULL, "group_size"},
        {"{\"quantization\": \"wint8\", \"is_quantized\": \"yes\"}", NULL, "is_quantized"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc;
        nb_err e = {{0}};
        plan(bad[i][0], bad[i][1], &rc, &e);
        CHECK(rc == -1 && strstr(e.msg, bad[i][2]) && !strchr(e.msg, '\n'), "%s / %s -> rc %d '%s'",
              bad[i][0] ? bad[i][0] : "-", bad[i][1] ? bad[i][1] : "-", rc, e.msg);
    }
}

static void write_config(const char *dir, const char *qc) {
    mkdir(dir, 0755);
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "{\"architectures\": [\"LlamaForCausalLM\"]%s%s}\n", qc ? ", \"quantization_config\": " : "", qc ? qc : "");
    fclose(f);
}

static void test_checkpoint_wins(void) {
    const char *dir = "build/tests/qc_ckpt";
    nb_err e = {{0}};
    nb_quant_plan req, p;
    quant_plan_parse("wint4", "int8", &req, &e);
    write_config(dir, "{\"quant_method\": \"fp8\", \"weight_block_size\": [128, 128], \"activation_scheme\": "
                      "\"dynamic\", \"fmt\": \"e4m3\", \"modules_to_not_convert\": [\"lm_head\"]}");
    int rc = quant_plan_resolve(dir, &req, &p, &e);
    CHECK(rc == 0 && p.dense == NB_FP8_B128 && p.is_quantized && p.kv == NB_KV_INT8,
          "HF FP8 config wins, KV request kept: rc %d dense %d kv %d (%s)", rc, p.dense, p.kv, e.msg);
    write_config(dir, "{\"quant_method\": \"nibble\", \"quantization\": \"wint2\", \"is_quantized\": true, "
                      "\"kv_cache_quant_type\": \"float8_e4m3fn\"}");
    rc = quant_plan_resolve(dir, &req, &p, &e);
    CHECK(rc == 0 && p.dense == NB_WINT2 && p.is_quantized && p.kv == NB_KV_FP8,
          "nibble checkpoint config wins, its KV type too: rc %d dense %d kv %d", rc, p.dense, p.kv);
    write_config(dir, NULL);
    rc = quant_plan_resolve(dir, &req, &p, &e);
    CHECK(rc == 0 && p.dense == NB_WINT4 && !p.is_quantized, "no config: the request stands");
    write_config(dir, "{\"quant_method\": \"gptq\", \"bits\": 4}");
    rc = quant_plan_resolve(dir, &req, &p, &e);
    CHECK(rc == -1 && strstr(e.msg, "gptq"), "unsupported checkpoint method: %s", e.msg);
}

static void test_groups(void) {
    nb_quant_plan p;
    nb_err e;
    quant_plan_parse("wint4", NULL, &p, &e);
    CHECK(quant_pick_group(&p, NB_WINT4, 1536) == 128, "K 1536 -> 128");
    CHECK(quant_pick_group(&p, NB_WINT4, 576) == 64, "K 576 -> 64");
    CHECK(quant_pick_group(&p, NB_WINT4, 200) == 200, "K 200 -> per channel");
    CHECK(quant_pick_group(&p, NB_WINT2, 576) == 64, "wint2 -> 64");
    CHECK(quant_pick_group(&p, NB_WINT8, 576) == 0, "wint8 has no groups");
}

int main(void) {
    RUN(test_names);
    RUN(test_mix_and_kv);
    RUN(test_errors);
    RUN(test_checkpoint_wins);
    RUN(test_groups);
    TEST_DONE("test_quant_config");
}
