/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Comma-separated header values (RFC 9110 section 5.6.1), read the same way
 * by the engine (response heads, l7engine.c) and its route decisions
 * (request heads, l7route.c).
 */
#ifndef KMESH_HTTP_TOKENS_H
#define KMESH_HTTP_TOKENS_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

static inline bool http_ws(char c) { return c == ' ' || c == '\t'; }

/* The next comma-separated element of the header value [v, v+n) from *i,
 * trimmed: [*a, *b). False once past the end (an empty value has one, empty). */
static inline bool next_token(const char *v, size_t n, size_t *i, size_t *a, size_t *b)
{
	if (*i > n)
		return false;
	size_t j = *i;
	while (j < n && v[j] != ',')
		j++;
	*a = *i;
	*b = j;
	while (*a < *b && http_ws(v[*a]))
		(*a)++;
	while (*b > *a && http_ws(v[*b - 1]))
		(*b)--;
	*i = j + 1;
	return true;
}

static inline bool token_is(const char *v, size_t a, size_t b, const char *tok)
{
	return b - a == strlen(tok) && strncasecmp(v + a, tok, b - a) == 0;
}

#endif
