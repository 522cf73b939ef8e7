// The tracer benchmark's and test's workload, run inside a busybox
// container: built static with the host's gcc by
// hyperbox_integration::workload and bind-mounted in, since the image has
// no compiler and busybox has no getpid loop.
//
//   syscalls loop N    N rounds of getpid, read(/dev/zero, 1), write(/dev/null, 1)
//   syscalls copy N    N copies of a 4 KiB file in /dev/shm (tmpfs: no disk in the figure)
//   syscalls opens N   N openat("") calls: each an open event, failing fast
//   syscalls open-paths N   N openat() of a missing 48-byte path
//
// An optional third argument waits that many ms before the work (so that it
// runs after the tracer's counting window). The work's own duration is
// printed as "work_ns <n>".
// Syscalls are made with syscall(2) so libc caches nothing.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int must_open(const char *path, int flags)
{
	int fd = open(path, flags, 0644);
	if (fd < 0) {
		perror(path);
		exit(2);
	}
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: %s loop|copy|opens|open-paths N [wait_ms]\n", argv[0]);
		return 2;
	}
	long n = atol(argv[2]);
	char buf[4096];
	if (argc == 4)
		usleep(atol(argv[3]) * 1000);
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (strcmp(argv[1], "loop") == 0) {
		int zero = must_open("/dev/zero", O_RDONLY);
		int null = must_open("/dev/null", O_WRONLY);
		for (long i = 0; i < n; i++) {
			syscall(SYS_getpid);
			if (syscall(SYS_read, zero, buf, 1) != 1 || syscall(SYS_write, null, buf, 1) != 1)
				return 1;
		}
	} else if (strcmp(argv[1], "copy") == 0) {
		memset(buf, 'x', sizeof(buf));
		int src = must_open("/dev/shm/src", O_WRONLY | O_CREAT | O_TRUNC);
		if (write(src, buf, sizeof(buf)) != sizeof(buf))
			return 1;
		close(src);
		for (long i = 0; i < n; i++) {
			int in = must_open("/dev/shm/src", O_RDONLY);
			int out = must_open("/dev/shm/dst", O_WRONLY | O_CREAT | O_TRUNC);
			ssize_t got = read(in, buf, sizeof(buf));
			if (got <= 0 || write(out, buf, got) != got)
				return 1;
			close(in);
			close(out);
		}
	} else if (strcmp(argv[1], "opens") == 0) {
		for (long i = 0; i < n; i++)
			syscall(SYS_openat, AT_FDCWD, "", O_RDONLY);
	} else if (strcmp(argv[1], "open-paths") == 0) {
		// A path as long as a typical library's; /usr/lib has no such
		// directory, so the lookup fails at its third component.
		for (long i = 0; i < n; i++)
			syscall(SYS_openat, AT_FDCWD, "/usr/lib/x86_64-linux-gnu/hyperbox/libbench.so.1", O_RDONLY);
	} else {
		fprintf(stderr, "unknown mode %s\n", argv[1]);
		return 2;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("work_ns %lld\n", (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
