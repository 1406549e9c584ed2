// api/pool_protocol.hpp — the frames a worker pool and its workers exchange over one Unix stream
// socket per worker. Internal to the api layer.
//
// A frame is a fixed 28-byte header (kind u32, task u64, message length u64, payload length u64,
// host byte order: both ends are the same program) followed by the message and payload bytes.
// A stream socket rather than pipes: one descriptor per side, and MSG_NOSIGNAL, so writing to a
// worker that has just died is an error to handle, not a SIGPIPE that kills the pool's process.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace gpuslot::pool_protocol {

enum class FrameKind : std::uint32_t {
  task = 1,         // pool -> worker: run `payload` as task `task`
  ready = 2,        // worker -> pool: init succeeded
  init_failed = 3,  // worker -> pool: init failed with `message`
  succeeded = 4,    // worker -> pool: task `task` returned `payload`
  failed = 5,       // worker -> pool: task `task` failed with `message` (+ `payload` for the caller)
};

struct Frame {
  FrameKind kind = FrameKind::task;
  std::uint64_t task = 0;
  std::string message;
  std::string payload;
};

// Writes a whole frame, waiting for room when the socket is non-blocking. False when the other
// end is gone (or any other write error).
bool write_frame(int fd, const Frame& frame);

// Reads one whole frame, blocking (the worker side). nullopt at end of input or on error.
std::optional<Frame> read_frame(int fd);

// Accumulates bytes read from a non-blocking socket and hands out whole frames (the pool side).
class FrameReader {
 public:
  // Reads what is available. False when the other end has closed (or on a read error).
  bool fill(int fd);
  std::optional<Frame> next();

 private:
  std::string buffer_;
  std::size_t offset_ = 0;
};

}  // namespace gpuslot::pool_protocol
