/* Order statistics of plain arrays. See include/hilal/stats.h. */
#include "hilal/stats.h"

#include <math.h>
#include <stdlib.h>

float hilal_select_kth_float(float *v, size_t n, size_t kth)
{
    /* Hoare's selection with Wirth's partition scheme (N. Wirth,
     * Algorithms + Data Structures = Programs, 1976, sec. 2.3.4), O(n) on
     * average: partition [lo, hi] around the value now at k, then keep the
     * side that holds k, until that side is k alone. */
    long lo = 0, hi = (long)n - 1, k = (long)kth;
    while (lo < hi) {
        float pivot = v[k];
        long i = lo, j = hi;
        do {
            while (v[i] < pivot)
                i++;
            while (pivot < v[j])
                j--;
            if (i <= j) {
                float t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        } while (i <= j);
        if (j < k)
            lo = i;
        if (k < i)
            hi = j;
    }
    return v[k];
}

double hilal_median_float(float *v, size_t n)
{
    if (n == 0)
        return NAN;
    double upper = hilal_select_kth_float(v, n, n / 2);
    if (n % 2 == 1)
        return upper;
    /* Even n: the lower middle value is the largest of v[0 .. n/2), which
     * the selection left below v[n/2]. */
    float lower = v[0];
    for (size_t i = 1; i < n / 2; i++)
        lower = v[i] > lower ? v[i] : lower;
    return 0.5 * ((double)lower + upper);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double hilal_median_double(double *v, size_t n)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
