/*
 * blas.h: the one place that names the BLAS library.
 *
 * The default build links the OpenBLAS of the scipy-openblas32 wheel, whose
 * symbols carry the prefix "scipy_". Building with SKUPY_BLAS=system defines
 * SKUPY_SYSTEM_BLAS and links a system OpenBLAS with the plain cblas names.
 */
#ifndef SKUPY_BLAS_H
#define SKUPY_BLAS_H

#include <cblas.h>

#ifdef SKUPY_SYSTEM_BLAS
#define sk_sgemm cblas_sgemm
#define sk_blas_set_num_threads openblas_set_num_threads
#define sk_blas_get_num_threads openblas_get_num_threads
#else
#define sk_sgemm scipy_cblas_sgemm
#define sk_blas_set_num_threads scipy_openblas_set_num_threads
#define sk_blas_get_num_threads scipy_openblas_get_num_threads
#endif

#endif
