/* Small branch-free helpers for the pixel loops of the stages (private to
 * the library). */
#ifndef HILAL_VECOPS_H
#define HILAL_VECOPS_H

#include <stdint.h>
#include <string.h>

/* v when keep is 1, +0 when it is 0 (a select on the bits: the compiler
 * vectorises it, where it does not a conditional expression). */
static inline float zero_unless(float v, int keep)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= 0u - (uint32_t)keep;
    memcpy(&v, &bits, sizeof v);
    return v;
}

#endif
