// When the element-wise C kernels split their rows over OpenMP threads.
#pragma once

// Below this many elements a parallel region's start and join cost more than
// the work (a decode step's norms and gates run on one thread), above it the
// rows are split (a prompt chunk's).
#define PARALLEL_MIN_ELEMENTS 32768
