// LD_PRELOAD shim for the hostfault suite (test_host_faults.py): steps the wall clock of one
// process tree, never the machine's. CLOCK_REALTIME (clock_gettime, gettimeofday, time) is moved
// by the signed number of milliseconds in the file $TB_FAKECLOCK_FILE, re-read at most every
// 20 ms. Monotonic and boot-time clocks are left alone, as a real step (NTP, date -s) leaves
// them. libfaketime was tried first: with FAKETIME_DONT_FAKE_MONOTONIC it still moves absolute
// CLOCK_BOOTTIME timerfd deadlines by the offset, so sd-event's timers stopped after a step.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static long long offset_ms(void) {
  static long long cached;
  static long long next_read_ns;
  struct timespec mono;
  syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &mono);
  const long long now_ns = mono.tv_sec * 1000000000LL + mono.tv_nsec;
  if (now_ns < next_read_ns) return cached;
  next_read_ns = now_ns + 20000000LL;
  const char* path = getenv("TB_FAKECLOCK_FILE");
  if (!path) return 0;
  const int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return cached;
  char buf[64];
  const ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n > 0) {
    buf[n] = '\0';
    cached = strtoll(buf, NULL, 10);
  }
  return cached;
}

static void shift(struct timespec* ts) {
  const long long ns = ts->tv_sec * 1000000000LL + ts->tv_nsec + offset_ms() * 1000000LL;
  ts->tv_sec = (time_t)(ns / 1000000000LL);
  ts->tv_nsec = (long)(ns % 1000000000LL);
  if (ts->tv_nsec < 0) {
    ts->tv_nsec += 1000000000L;
    ts->tv_sec -= 1;
  }
}

int clock_gettime(clockid_t id, struct timespec* ts) {
  const long r = syscall(SYS_clock_gettime, id, ts);
  if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) shift(ts);
  return (int)r;
}

int gettimeofday(struct timeval* restrict tv, void* restrict tz) {
  (void)tz;
  struct timespec ts;
  if (clock_gettime(CLOCK_REALTIME, &ts) != 0) return -1;
  if (tv) {
    tv->tv_sec = ts.tv_sec;
    tv->tv_usec = ts.tv_nsec / 1000;
  }
  return 0;
}

time_t time(time_t* out) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  if (out) *out = ts.tv_sec;
  return ts.tv_sec;
}
