// pool_protocol.cpp — framing for the worker pool's sockets (see pool_protocol.hpp).
#include "api/pool_protocol.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/fd_io.hpp"

namespace gpuslot::pool_protocol {

namespace {

constexpr std::size_t kHeaderBytes = 4 + 8 + 8 + 8;
constexpr std::uint64_t kMaxPartBytes = 1ull << 40;  // a corrupt length must not become a huge allocation

using fd_io::read_exactly;
using fd_io::send_all;

void put(char*& out, const void* value, std::size_t size) {
  std::memcpy(out, value, size);
  out += size;
}

struct Header {
  std::uint32_t kind;
  std::uint64_t task, message_bytes, payload_bytes;
};

Header decode(const char* in) {
  Header header{};
  std::memcpy(&header.kind, in, 4);
  std::memcpy(&header.task, in + 4, 8);
  std::memcpy(&header.message_bytes, in + 12, 8);
  std::memcpy(&header.payload_bytes, in + 20, 8);
  return header;
}

}  // namespace

bool write_frame(int fd, const Frame& frame) {
  char header[kHeaderBytes];
  char* out = header;
  const auto kind = static_cast<std::uint32_t>(frame.kind);
  const std::uint64_t message_bytes = frame.message.size();
  const std::uint64_t payload_bytes = frame.payload.size();
  put(out, &kind, 4);
  put(out, &frame.task, 8);
  put(out, &message_bytes, 8);
  put(out, &payload_bytes, 8);
  return send_all(fd, header, sizeof header) && send_all(fd, frame.message.data(), frame.message.size()) &&
         send_all(fd, frame.payload.data(), frame.payload.size());
}

std::optional<Frame> read_frame(int fd) {
  char raw[kHeaderBytes];
  if (!read_exactly(fd, raw, sizeof raw)) return std::nullopt;
  const Header header = decode(raw);
  if (header.message_bytes > kMaxPartBytes || header.payload_bytes > kMaxPartBytes) return std::nullopt;
  Frame frame;
  frame.kind = static_cast<FrameKind>(header.kind);
  frame.task = header.task;
  frame.message.resize(header.message_bytes);
  frame.payload.resize(header.payload_bytes);
  if (!read_exactly(fd, frame.message.data(), frame.message.size()) || !read_exactly(fd, frame.payload.data(), frame.payload.size())) {
    return std::nullopt;
  }
  return frame;
}

bool FrameReader::fill(int fd) {
  char chunk[65536];
  for (;;) {
    const ssize_t n = ::read(fd, chunk, sizeof chunk);
    if (n > 0) {
      buffer_.append(chunk, std::size_t(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    return false;  // 0: closed; other errors count as closed
  }
}

std::optional<Frame> FrameReader::next() {
  if (buffer_.size() - offset_ < kHeaderBytes) return std::nullopt;
  const Header header = decode(buffer_.data() + offset_);
  if (header.message_bytes > kMaxPartBytes || header.payload_bytes > kMaxPartBytes) return std::nullopt;
  const std::uint64_t total = kHeaderBytes + header.message_bytes + header.payload_bytes;
  if (buffer_.size() - offset_ < total) return std::nullopt;
  Frame frame;
  frame.kind = static_cast<FrameKind>(header.kind);
  frame.task = header.task;
  const char* body = buffer_.data() + offset_ + kHeaderBytes;
  frame.message.assign(body, header.message_bytes);
  frame.payload.assign(body + header.message_bytes, header.payload_bytes);
  offset_ += total;
  if (offset_ == buffer_.size()) {
    buffer_.clear();
    offset_ = 0;
  } else if (offset_ > (1u << 20)) {
    buffer_.erase(0, offset_);
    offset_ = 0;
  }
  return frame;
}

}  // namespace gpuslot::pool_protocol
