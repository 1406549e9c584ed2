// gpuslot/error.hpp — the error policy every layer follows (see ARCHITECTURE.md).
//
// Expected failures (a bad size, NVML missing, nothing fits) are *values*: functions return
// Result<T>, which holds either the value or an Error with a code and a one-line message a user
// can act on. Exceptions are only for "abort this command" and are caught once per entry point
// (main(), the Python module); no exception crosses the C or Python boundary.
#pragma once

#include <cassert>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace gpuslot {

// What went wrong, in the terms the exit codes use (DESIGN.md "Exit codes").
enum class Errc {
  nothing_fits,      // exit 1: the request is valid but no GPU has room now
  bad_input,         // exit 2: malformed size, unknown device spec, corrupt file, usage
  nvml_unavailable,  // exit 3: no NVML library / driver where a GPU was required
  nvml_error,        // exit 3: NVML loaded but a call failed (message carries NVML's own text)
  state,             // exit 4: the shared state directory is unusable (permissions, full disk)
  timeout,           // exit 124: waited as long as asked (like timeout(1))
  internal,          // exit 70: a bug in gpuslot
};

// Exit status a command returns for an error of this kind.
int exit_code_of(Errc code) noexcept;

// Short name of the kind, for JSON output ("bad_input", …).
const char* errc_name(Errc code) noexcept;

struct Error {
  Errc code = Errc::internal;
  std::string message;  // one line: what was wrong and what is accepted
  int nvml_code = 0;     // NVML's nvmlReturn_t when the error came from an NVML call, else 0
};

// A value or an Error. Small on purpose: ok(), value(), error(), and -> / * access.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : storage_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit
  Result(Error error) : storage_(std::in_place_index<1>, std::move(error)) {}  // NOLINT: implicit

  bool ok() const noexcept { return storage_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { assert(ok()); return std::get<0>(storage_); }
  const T& value() const& { assert(ok()); return std::get<0>(storage_); }
  T&& value() && { assert(ok()); return std::get<0>(std::move(storage_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { assert(!ok()); return std::get<1>(storage_); }
  Error&& error() && { assert(!ok()); return std::get<1>(std::move(storage_)); }

 private:
  std::variant<T, Error> storage_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT: implicit
  bool ok() const noexcept { return ok_; }
  explicit operator bool() const noexcept { return ok_; }
  const Error& error() const& { assert(!ok_); return error_; }

 private:
  Error error_;
  bool ok_ = true;
};

// Text a user gave, quoted for a one-line message: '…', control and non-ASCII bytes as \xNN,
// cut after 64 characters, so no input can break or flood the one-line error promise.
std::string quote_for_message(std::string_view text);

inline Error make_error(Errc code, std::string message) { return Error{code, std::move(message)}; }

// "Abort this command": thrown only at the top of a command, caught once in main().
class CommandError : public std::runtime_error {
 public:
  explicit CommandError(Error error) : std::runtime_error(error.message), error_(std::move(error)) {}
  const Error& error() const noexcept { return error_; }

 private:
  Error error_;
};

// Unwraps a Result or throws CommandError: for command code only, never inside the library.
template <class T>
T value_or_throw(Result<T> result) {
  if (!result) throw CommandError(std::move(result).error());
  return std::move(result).value();
}

}  // namespace gpuslot
