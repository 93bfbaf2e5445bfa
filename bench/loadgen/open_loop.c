/* open_loop [-w] PATH COUNT [RATE]: open(PATH, O_RDONLY) and close it COUNT times, at RATE
 * opens/s (0 or absent = unthrottled), then print one JSON line. With -w, wait for a
 * line on stdin before starting (so a benchmark can attach a tracer to our pid first). */
#include <fcntl.h>
#include <unistd.h>

#include "pace.h"

int main(int argc, char **argv)
{
	unsigned long long count, i, failed = 0;
	double rate = 0.0, secs;
	struct timespec start;
	int wait_first = 0, fd;
	const char *path;

	if (argc > 1 && strcmp(argv[1], "-w") == 0) {
		wait_first = 1;
		argv++;
		argc--;
	}
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: open_loop [-w] PATH COUNT [RATE]\n");
		return 2;
	}
	path = argv[1];
	count = parse_count(argv[2], "COUNT");
	if (argc == 4)
		rate = (double)parse_count(argv[3], "RATE");
	if (wait_first)
		wait_for_line();

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (i = 1; i <= count; i++) {
		fd = open(path, O_RDONLY);
		if (fd >= 0)
			close(fd);
		else
			failed++;
		pace(&start, rate, i);
	}
	secs = now_s() - ts_s(&start);
	printf("{\"opens\":%llu,\"failed\":%llu,\"seconds\":%.6f,\"rate\":%.1f,\"pid\":%d}\n",
	       count, failed, secs, secs > 0 ? (double)count / secs : 0.0, (int)getpid());
	return 0;
}
