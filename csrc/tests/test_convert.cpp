// C++ unit test of common/convert.cuh on the host: round trips and known bit patterns.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "common/convert.cuh"

static int failures = 0;

static void expect(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "FAIL: %s\n", what);
        ++failures;
    }
}

int main() {
    using namespace peftkern;
    expect(float_to_bf16_bits(1.0f) == 0x3f80, "bf16(1.0)");
    expect(float_to_bf16_bits(-2.0f) == 0xc000, "bf16(-2.0)");
    expect(float_to_fp16_bits(1.0f) == 0x3c00, "fp16(1.0)");
    expect(float_to_fp16_bits(65504.0f) == 0x7bff, "fp16(max)");
    expect(float_to_fp16_bits(65520.0f) == 0x7c00, "fp16 overflow to inf");
    expect(float_to_fp16_bits(5.9604644775390625e-08f) == 0x0001, "fp16 smallest subnormal");
    // ties to even: 1 + 2^-8 lies halfway between two bf16 values; the even one is 1.0
    expect(float_to_bf16_bits(1.00390625f) == 0x3f80, "bf16 tie to even (down)");
    expect(float_to_bf16_bits(1.01171875f) == 0x3f82, "bf16 tie to even (up)");
    expect(std::isnan(bf16_bits_to_float(float_to_bf16_bits(std::nanf("")))), "bf16 NaN");
    // every bf16 and fp16 pattern survives float and back (NaNs stay NaN)
    for (uint32_t bits = 0; bits < 0x10000u; ++bits) {
        uint16_t b = static_cast<uint16_t>(bits);
        float fb = bf16_bits_to_float(b);
        if (!std::isnan(fb) && float_to_bf16_bits(fb) != b) { expect(false, "bf16 round trip"); break; }
        float fh = fp16_bits_to_float(b);
        if (!std::isnan(fh) && float_to_fp16_bits(fh) != b) { expect(false, "fp16 round trip"); break; }
    }
    if (failures == 0) std::printf("test_convert: all passed\n");
    return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
