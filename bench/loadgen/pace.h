/* Shared helpers for the load generators: monotonic time and chunked pacing. */
#ifndef LOADGEN_PACE_H
#define LOADGEN_PACE_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double ts_s(const struct timespec *ts)
{
	return (double)ts->tv_sec + (double)ts->tv_nsec / 1e9;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts_s(&ts);
}

/* Pace in chunks of about 1 ms: after operation `done` (counted from 1), sleep until the
 * absolute time start + done / rate once a chunk is complete. Sleeping to an absolute deadline
 * keeps the mean rate exact even when single sleeps overshoot. */
static void pace(const struct timespec *start, double rate, unsigned long long done)
{
	unsigned long long chunk = rate >= 1000.0 ? (unsigned long long)(rate / 1000.0) : 1;
	double t;
	struct timespec when;

	if (rate <= 0.0 || done % chunk != 0)
		return;
	t = ts_s(start) + (double)done / rate;
	when.tv_sec = (time_t)t;
	when.tv_nsec = (long)((t - (double)when.tv_sec) * 1e9);
	if (when.tv_nsec >= 1000000000L) {
		when.tv_sec++;
		when.tv_nsec -= 1000000000L;
	}
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &when, NULL) != 0)
		;
}

static unsigned long long parse_count(const char *s, const char *what)
{
	char *end;
	unsigned long long v = strtoull(s, &end, 10);

	if (*s == '\0' || *end != '\0' || *s == '-') {
		fprintf(stderr, "bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

/* Blocks until a line (or EOF) arrives on stdin, so a benchmark can attach to our pid first. */
static void wait_for_line(void)
{
	int c;

	do
		c = getchar();
	while (c != '\n' && c != EOF);
}

#endif
