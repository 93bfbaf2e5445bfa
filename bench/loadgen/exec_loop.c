/* exec_loop [-w] [-p PROG] COUNT [RATE]: fork and exec PROG (default /bin/true) COUNT times,
 * waiting for each child, at RATE execs/s (0 or absent = unthrottled); print one JSON line.
 * With -w, wait for a line on stdin before starting (so a tracer can attach to our pid). */
#include <sys/wait.h>
#include <unistd.h>

#include "pace.h"

int main(int argc, char **argv)
{
	unsigned long long count, i, failed = 0;
	const char *prog = "/bin/true";
	double rate = 0.0, secs;
	struct timespec start;
	int opt, wait_first = 0, st;
	pid_t pid;

	while ((opt = getopt(argc, argv, "+wp:")) != -1) {
		switch (opt) {
		case 'w':
			wait_first = 1;
			break;
		case 'p':
			prog = optarg;
			break;
		default:
			goto usage;
		}
	}
	if (argc - optind < 1 || argc - optind > 2)
		goto usage;
	count = parse_count(argv[optind], "COUNT");
	if (argc - optind == 2)
		rate = (double)parse_count(argv[optind + 1], "RATE");
	if (wait_first)
		wait_for_line();

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (i = 1; i <= count; i++) {
		pid = fork();
		if (pid == 0) {
			execl(prog, prog, (char *)NULL);
			_exit(127);
		}
		if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
			failed++;
		pace(&start, rate, i);
	}
	secs = now_s() - ts_s(&start);
	printf("{\"execs\":%llu,\"failed\":%llu,\"seconds\":%.6f,\"rate\":%.1f,\"pid\":%d}\n",
	       count, failed, secs, secs > 0 ? (double)count / secs : 0.0, (int)getpid());
	return 0;
usage:
	fprintf(stderr, "usage: exec_loop [-w] [-p PROG] COUNT [RATE]\n");
	return 2;
}
