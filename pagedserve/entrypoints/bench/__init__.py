"""`pagedserve bench`: a serving benchmark client with vLLM's flags and result keys (serve), a
side-by-side comparison of serving systems on one workload (compare, compare-hf), and a paged
attention kernel benchmark (kernels)."""
