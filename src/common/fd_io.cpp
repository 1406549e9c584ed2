// fd_io.cpp — whole reads and writes on a descriptor (see fd_io.hpp).
#include "common/fd_io.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

namespace gpuslot::fd_io {

namespace {

// One loop for all three: `step` moves at most `left` bytes and returns what ::write, ::send or
// ::read would.
template <typename Step>
bool transfer(int fd, std::size_t size, short ready_event, Step step) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = step(done, size - done);
    if (n > 0) {
      done += std::size_t(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd descriptor{fd, ready_event, 0};
      ::poll(&descriptor, 1, 1000);
      if ((descriptor.revents & (POLLERR | POLLHUP | POLLNVAL)) != 0 && (descriptor.revents & ready_event) == 0) return false;
      continue;
    }
    return false;
  }
  return true;
}

}  // namespace

bool write_all(int fd, const char* data, std::size_t size) {
  return transfer(fd, size, POLLOUT, [&](std::size_t done, std::size_t left) {
    const ssize_t n = ::write(fd, data + done, left);
    if (n == 0) errno = ENOSPC;
    return n;
  });
}

bool send_all(int fd, const char* data, std::size_t size) {
  return transfer(fd, size, POLLOUT, [&](std::size_t done, std::size_t left) { return ::send(fd, data + done, left, MSG_NOSIGNAL); });
}

bool read_exactly(int fd, char* data, std::size_t size) {
  return transfer(fd, size, POLLIN, [&](std::size_t done, std::size_t left) { return ::read(fd, data + done, left); });
}

}  // namespace gpuslot::fd_io
