/* Order statistics of plain arrays: the k-th smallest value and the median,
 * for the library, the stages and the command-line program alike. */
#ifndef HILAL_STATS_H
#define HILAL_STATS_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The k-th smallest (0-based, k < n) of v[0..n), reordering v so that
 * v[i] <= v[k] for i < k and v[i] >= v[k] for i > k. v must hold no NaN. */
float hilal_select_kth_float(float *v, size_t n, size_t k);

/* The median of v[0..n), reordering v: the middle value, or for even n the
 * mean of the two middle values (in double). NaN for n == 0. v must hold no
 * NaN. */
double hilal_median_float(float *v, size_t n);

/* The same for doubles; v ends up sorted in ascending order. */
double hilal_median_double(double *v, size_t n);

#ifdef __cplusplus
}
#endif
#endif
