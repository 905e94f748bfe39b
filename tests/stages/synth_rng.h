/* Seeded random numbers for the synthetic fields of the stage tests:
 * splitmix64 (S. Vigna) for uniform deviates and Box-Muller for Gaussian
 * ones. Two forms: one generator per test program, seeded by setting
 * rng_state (rng_uniform, rng_gauss), and generators held in a synth_rng
 * (synth_uniform, synth_gauss, which keeps the second deviate of each
 * pair). Header-only, static functions. */
#ifndef HILAL_TEST_SYNTH_RNG_H
#define HILAL_TEST_SYNTH_RNG_H

#include <math.h>
#include <stdint.h>

static uint64_t rng_state __attribute__((unused));

/* Uniform in (0, 1). */
static inline double rng_uniform(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return ((z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

/* Standard normal (Box-Muller, one deviate per pair of uniforms). */
static inline double rng_gauss(void)
{
    double u = rng_uniform(), v = rng_uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

typedef struct synth_rng {
    uint64_t s;     /* state; set to the seed */
    int have;       /* spare holds a deviate not yet returned */
    double spare;
} synth_rng;

static inline uint64_t synth_u64(synth_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1). */
static inline double synth_uniform(synth_rng *r)
{
    return ((double)(synth_u64(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

/* Standard normal (Box-Muller, both deviates of a pair used). */
static inline double synth_gauss(synth_rng *r)
{
    if (r->have) {
        r->have = 0;
        return r->spare;
    }
    double u = synth_uniform(r), v = synth_uniform(r);
    double m = sqrt(-2.0 * log(u));
    r->spare = m * sin(2.0 * 3.14159265358979323846 * v);
    r->have = 1;
    return m * cos(2.0 * 3.14159265358979323846 * v);
}

#endif
