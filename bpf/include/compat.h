/* SPDX-License-Identifier: GPL-2.0 */
/* What differs between the kernels kmesh runs on (5.10 and newer), in one
 * place. Two kinds of difference:
 *
 * - Instructions the verifier refuses outright cannot be hidden behind a
 *   branch: atomics that return the old value (BPF_FETCH) and atomic and/or
 *   arrived in 5.12. build.sh compiles every object twice, the second time
 *   with KMESH_LEGACY_ATOMICS into build/bpf/legacy/; the daemon loads that
 *   flavour where a probe finds no BPF_FETCH (src/kmesh/bpf/features.py).
 *   Its stand-ins below are exact when one CPU runs them at a time (the
 *   usual case: a socket's release and close run on the CPU that closes it)
 *   and err only the safe way under a race (docs/kernels.md).
 *
 * - Helpers a kernel lacks are fine in code the verifier can prove dead:
 *   bpf_core_*_exists() is resolved by libbpf from the running kernel's BTF
 *   before loading, so the branch that calls a missing helper is a constant
 *   false. A program the kernel cannot take at all (the splice verdict,
 *   where a probe load of what it does fails) is not loaded (autoload off).
 */
#ifndef __KMESH_COMPAT_H__
#define __KMESH_COMPAT_H__

#include <bpf/bpf_core_read.h>

#define KMESH_READ_ONCE(x) (*(volatile typeof(x) *)&(x))

#ifdef KMESH_LEGACY_ATOMICS
/* Only BPF_XADD (an atomic add whose result is unused) exists. */

/* The value before adding `v`: read, then add. Two CPUs at once may both
 * read the same value (round robin hands them the same slot). */
#define kmesh_fetch_add(p, v)                                    \
	({                                                       \
		typeof(*(p)) __old = KMESH_READ_ONCE(*(p));      \
		__sync_fetch_and_add((p), (v));                  \
		__old;                                           \
	})
/* The value after adding `v`: add, then read. Racing CPUs may read each
 * other's adds too, so the result is never below the exact one: a limit
 * checked with it is never exceeded (it may refuse one too many). */
#define kmesh_add_fetch(p, v)                                    \
	({                                                       \
		__sync_fetch_and_add((p), (v));                  \
		KMESH_READ_ONCE(*(p));                           \
	})
/* Clear bits and return the old value: not atomic. */
#define kmesh_fetch_and(p, v)                                    \
	({                                                       \
		typeof(*(p)) __old = KMESH_READ_ONCE(*(p));      \
		KMESH_READ_ONCE(*(p)) = __old & (v);             \
		__old;                                           \
	})
#define kmesh_or(p, v) (KMESH_READ_ONCE(*(p)) |= (v))
#else
#define kmesh_fetch_add(p, v) __sync_fetch_and_add((p), (v))
#define kmesh_add_fetch(p, v) __sync_add_and_fetch((p), (v))
#define kmesh_fetch_and(p, v) __sync_fetch_and_and((p), (v))
#define kmesh_or(p, v) ((void)__sync_fetch_and_or((p), (v)))
#endif

/* bpf_set_retval() (5.18): a refused connect() fails with the errno kmesh
 * chooses. Before it, a cgroup sock_addr program that refuses fails the
 * syscall with EPERM. */
#define kmesh_has_set_retval() bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_set_retval)

#endif /* __KMESH_COMPAT_H__ */
