/* Order statistics: the k-th smallest value and the median against a sorted
 * copy, on random data with many ties and on the edge cases. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hilal/stats.h"
#include "testutil.h"

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* A small deterministic generator (xorshift64*), so that the data are the
 * same on every platform. */
static unsigned long long next(unsigned long long *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ULL;
}

static void test_select_and_median(void)
{
    unsigned long long seed = 12345;
    int bad_kth = 0, bad_partition = 0, bad_med = 0, bad_medd = 0;
    for (int trial = 0; trial < 2000; trial++) {
        size_t n = 1 + (size_t)(next(&seed) % (trial % 10 == 0 ? 1000 : 30));
        float *v = malloc(n * sizeof *v), *sorted = malloc(n * sizeof *sorted);
        double *d = malloc(n * sizeof *d);
        if (v == NULL || sorted == NULL || d == NULL)
            return;
        /* Every third trial draws from 5 values only: many ties. */
        for (size_t i = 0; i < n; i++) {
            unsigned long long r = next(&seed);
            v[i] = trial % 3 == 0 ? (float)(r % 5) : (float)((double)(r % 2000001) / 1000.0 - 1000.0);
            d[i] = v[i];
        }
        memcpy(sorted, v, n * sizeof *v);
        qsort(sorted, n, sizeof *sorted, cmp_float);
        double want = n % 2 ? sorted[n / 2] : 0.5 * ((double)sorted[n / 2 - 1] + sorted[n / 2]);

        size_t k = (size_t)(next(&seed) % n);
        float *w = malloc(n * sizeof *w);
        if (w != NULL) {
            memcpy(w, v, n * sizeof *v);
            float got = hilal_select_kth_float(w, n, k);
            bad_kth += got != sorted[k];
            for (size_t i = 0; i < n; i++)
                bad_partition += (i < k && w[i] > got) || (i > k && w[i] < got);
            free(w);
        }
        bad_med += hilal_median_float(v, n) != want;
        bad_medd += hilal_median_double(d, n) != want;
        free(v);
        free(sorted);
        free(d);
    }
    CHECK(bad_kth == 0, "k-th smallest wrong in %d of 2000 trials", bad_kth);
    CHECK(bad_partition == 0, "%d values on the wrong side of the k-th", bad_partition);
    CHECK(bad_med == 0, "float median wrong in %d trials", bad_med);
    CHECK(bad_medd == 0, "double median wrong in %d trials", bad_medd);

    float two[2] = {3.0f, 1.0f}, one[1] = {7.5f};
    double dtwo[2] = {1e300, -1e300};
    CHECK(hilal_median_float(two, 2) == 2.0, "median of {3, 1} is 2");
    CHECK(hilal_median_float(one, 1) == 7.5, "median of one value");
    CHECK(hilal_median_double(dtwo, 2) == 0.0 && dtwo[0] == -1e300, "double median, sorted");
    CHECK(isnan(hilal_median_float(one, 0)) && isnan(hilal_median_double(dtwo, 0)),
          "no values: NaN");
}

int main(void)
{
    test_select_and_median();
    return hilal_test_finish();
}
