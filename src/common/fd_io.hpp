// common/fd_io.hpp — whole reads and writes on a descriptor (internal to gpuslot).
//
// Each retries EINTR and short transfers, and waits (poll) on EAGAIN, so a non-blocking
// descriptor works too. false with errno set otherwise (ENOSPC for a write that made no progress,
// 0 from read: the other end closed, errno untouched).
#pragma once

#include <cstddef>

namespace gpuslot::fd_io {

bool write_all(int fd, const char* data, std::size_t size);
// send(2) with MSG_NOSIGNAL: a closed peer is EPIPE, never SIGPIPE.
bool send_all(int fd, const char* data, std::size_t size);
bool read_exactly(int fd, char* data, std::size_t size);

}  // namespace gpuslot::fd_io
