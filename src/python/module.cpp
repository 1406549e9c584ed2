// module.cpp — gpuslot._gpuslot, the thin binding under the `gpuslot` Python package.
//
// Everything that decides lives in C++ (include/gpuslot/gpuslot.hpp, pool.hpp); this file only
// converts values, turns Error into the package's typed exceptions (gpuslot/errors.py), releases
// the GIL while C++ waits, and makes the pool's fork and callbacks safe for the interpreter:
// - Waits (a lease with wait=True, map, close) run without the GIL and wake every 100 ms to run
//   Python's signal handlers, so Ctrl-C interrupts them.
// - The pool forks from its dispatcher thread. Before fork the GIL is taken and
//   PyOS_BeforeFork called, as os.fork does; the child runs PyOS_AfterFork_Child and keeps the
//   GIL for the rest of its life (it runs only the worker's Python code, then _exits).
// - Python objects captured by C++ callbacks are released under the GIL (gil_deleter).
// No C++ exception crosses into Python: pybind11 converts the few that can occur, and every
// library call returns a Result, turned into a gpuslot exception here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <Python.h>
#include <unistd.h>

#include <cerrno>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gpuslot/gpuslot.hpp"
#include "gpuslot/pool.hpp"

namespace py = pybind11;

namespace {

using namespace std::chrono_literals;

// Python text for a line gpuslot wrote. Such lines may carry bytes that are not UTF-8 — a file
// name any user can create in the shared state directory, a GPUSLOT_STATE_DIR path, a command —
// and pybind11's own conversion would raise UnicodeDecodeError for them, turning a warning about
// someone else's file into a failure of this call. Undecodable bytes are shown as \xNN instead.
py::str text_of(std::string_view line) {
  PyObject* decoded = PyUnicode_DecodeUTF8(line.data(), Py_ssize_t(line.size()), "backslashreplace");
  if (decoded == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(decoded);
}

py::list to_list(const std::vector<std::string>& lines) {
  py::list list;
  for (const auto& line : lines) list.append(text_of(line));
  return list;
}

// Raises the gpuslot exception for `error` (gpuslot.errors.from_error builds it); `log`, when
// given, becomes its `log` attribute (lines said before the failure).
[[noreturn]] void raise_error(const gpuslot::Error& error, const gpuslot::Explanation* explanation = nullptr,
                              py::object log = py::none()) {
  py::module_ errors = py::module_::import("gpuslot.errors");
  py::list reasons;
  py::list warnings;
  if (explanation != nullptr) {
    reasons = to_list(explanation->gpu_lines);
    warnings = to_list(explanation->warnings);
  }
  py::object exception = errors.attr("from_error")(gpuslot::errc_name(error.code), text_of(error.message), reasons, warnings);
  if (!log.is_none()) exception.attr("log") = log;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exception.ptr())), exception.ptr());
  throw py::error_already_set();
}

template <class T>
T unwrap(gpuslot::Result<T> result, const gpuslot::Explanation* explanation = nullptr) {
  if (!result) raise_error(result.error(), explanation);
  return std::move(result).value();
}

gpuslot::Strategy strategy_of(const std::string& text) { return unwrap(gpuslot::parse_strategy(text)); }

std::optional<std::chrono::milliseconds> milliseconds_of(std::optional<double> seconds, const char* what) {
  if (!seconds) return std::nullopt;
  if (!(*seconds >= 0) || *seconds > 1e9) {
    raise_error(gpuslot::make_error(gpuslot::Errc::bad_input, std::string("invalid ") + what + " " +
                                                                 std::to_string(*seconds) + ": expected seconds, 0 or more"));
  }
  return std::chrono::milliseconds(static_cast<long long>(*seconds * 1000.0));
}

// Whether the interpreter is shutting down. A thread that takes the GIL then is ended by Python
// on the spot (pthread_exit), unwinding through C++ frames that cannot be left that way (a
// destructor retaking the GIL): std::terminate. A daemon thread waiting in gpuslot.lease() at
// exit asks for the GIL every 100 ms, so it must not.
bool python_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Parks a thread that would need the GIL while the interpreter shuts down: the process is about
// to exit, and nothing this thread still has to do may touch Python.
[[noreturn]] void park_until_exit() {
  for (;;) ::pause();
}

// py::gil_scoped_release for a wait that may outlive the interpreter (a daemon thread in
// gpuslot.lease() at exit): taking the GIL back then would end the thread by unwinding, through
// this destructor among others, which terminates the process; the thread parks instead.
class GilReleased {
 public:
  GilReleased() : state_(PyEval_SaveThread()) {}
  ~GilReleased() {
    if (python_finalizing()) park_until_exit();
    PyEval_RestoreThread(state_);
  }
  GilReleased(const GilReleased&) = delete;
  GilReleased& operator=(const GilReleased&) = delete;

 private:
  PyThreadState* state_;
};

// The GIL, from any thread (the raw PyGILState API, which both pybind11 and CPython honour).
class Gil {
 public:
  Gil() {
    if (python_finalizing()) park_until_exit();
    state_ = PyGILState_Ensure();
  }
  ~Gil() { PyGILState_Release(state_); }
  Gil(const Gil&) = delete;
  Gil& operator=(const Gil&) = delete;

 private:
  PyGILState_STATE state_;
};

// True when Python has a signal to handle that raised (KeyboardInterrupt): the error stays set.
bool python_interrupted() {
  Gil gil;
  return PyErr_CheckSignals() != 0;
}

// A Python object shared with C++ threads: copied freely, released under the GIL.
using SharedObject = std::shared_ptr<py::object>;
SharedObject share(py::object object) {
  return SharedObject(new py::object(std::move(object)), [](py::object* held) {
    Gil gil;
    delete held;
  });
}

// --- leases ---

py::dict explanation_dict(const gpuslot::Explanation& explanation) {
  py::dict out;
  out["summary"] = text_of(explanation.summary);
  out["lines"] = to_list(explanation.gpu_lines);
  out["warnings"] = to_list(explanation.warnings);
  return out;
}

gpuslot::GpuLease acquire(std::uint64_t memory_bytes, unsigned gpus, const std::string& strategy, const std::string& device,
                          bool wait, std::optional<double> timeout_seconds, std::optional<unsigned> max_utilization,
                          const std::string& command, py::object on_pending, py::dict explanation_out) {
  gpuslot::LeaseRequest request;
  request.memory_bytes = memory_bytes;
  request.gpus = gpus;
  request.strategy = strategy_of(strategy);
  request.device = device;
  request.wait = wait;
  request.timeout = milliseconds_of(timeout_seconds, "timeout");
  request.max_utilization = max_utilization;
  request.command = command;
  bool interrupted = false;
  if (wait) {
    if (!on_pending.is_none()) {
      SharedObject callback = share(on_pending);
      request.on_pending = [callback, &interrupted](const std::string& reason) {
        Gil gil;
        try {
          (*callback)(text_of(reason));
        } catch (py::error_already_set& e) {
          // Ctrl-C while the reason was being logged ends the wait like Ctrl-C at any other
          // moment; an error of the logging itself must not.
          if (!e.matches(PyExc_Exception)) {
            e.restore();
            interrupted = true;
          } else {
            e.discard_as_unraisable("gpuslot lease on_pending");
          }
        }
      };
    }
    request.cancelled = [&interrupted] { return interrupted || (interrupted = python_interrupted()); };
  }
  gpuslot::Explanation explanation;
  gpuslot::Result<gpuslot::GpuLease> lease = gpuslot::make_error(gpuslot::Errc::internal, "not run");
  {
    GilReleased released;
    lease = gpuslot::acquire_lease(request, &explanation);
  }
  if (interrupted) throw py::error_already_set();  // the KeyboardInterrupt PyErr_CheckSignals left
  explanation_out.attr("update")(explanation_dict(explanation));
  return unwrap(std::move(lease), &explanation);
}

// --- the worker pool ---

// Python's fork: the GIL and the interpreter's fork hooks around fork(); see the file comment.
pid_t fork_for_python() {
  PyGILState_STATE state = PyGILState_Ensure();
  try {
    py::module_::import("gpuslot._pool").attr("_before_fork")();
  } catch (py::error_already_set& e) {
    e.discard_as_unraisable("gpuslot worker fork");
  }
  PyOS_BeforeFork();
  const pid_t pid = ::fork();
  if (pid == 0) {
    PyOS_AfterFork_Child();
    return 0;  // the child keeps the GIL
  }
  const int saved = errno;
  PyOS_AfterFork_Parent();
  PyGILState_Release(state);
  errno = saved;
  return pid;
}

py::dict device_dict(const gpuslot::WorkerDevice& device) {
  py::dict out;
  out["worker"] = device.worker;
  out["device"] = device.device;
  out["cuda_ordinal"] = device.cuda_ordinal;
  out["nvml_index"] = device.nvml_index;
  out["uuid"] = device.uuid;
  return out;
}

py::tuple result_tuple(const gpuslot::TaskResult& result) {
  const char* status = result.status == gpuslot::TaskResult::Status::succeeded ? "succeeded"
                       : result.status == gpuslot::TaskResult::Status::failed  ? "failed"
                                                                               : "cancelled";
  return py::make_tuple(status, py::bytes(result.payload), text_of(result.message), result.attempts, to_list(result.history),
                        result.device ? py::object(device_dict(*result.device)) : py::object(py::none()));
}

// Worker side, in the forked child (GIL held): gpuslot._pool helpers call init/work and turn
// their outcome into (ok, payload bytes, message).
gpuslot::TaskOutcome outcome_of(const py::object& returned) {
  const auto tuple = returned.cast<py::tuple>();
  if (tuple[0].cast<bool>()) return gpuslot::TaskOutcome::success(tuple[1].cast<std::string>());
  return gpuslot::TaskOutcome::failure(tuple[2].cast<std::string>(), tuple[1].cast<std::string>());
}

class PoolHandle {
 public:
  PoolHandle(py::object init, py::object work, std::uint64_t memory_bytes, std::optional<unsigned> workers, unsigned retries,
             const std::string& strategy, bool wait, std::optional<double> timeout_seconds, const std::string& command)
      : init_(std::move(init)), work_(std::move(work)), helpers_(py::module_::import("gpuslot._pool")) {
    gpuslot::PoolOptions options;
    options.memory_bytes = memory_bytes;
    options.workers = workers;
    options.retries = retries;
    options.strategy = strategy_of(strategy);
    options.wait = wait;
    options.wait_timeout = milliseconds_of(timeout_seconds, "timeout");
    options.command = command;
    // Raw pointers: the objects live as long as this handle, and the functions run only in the
    // forked child, where the GIL is held. No reference count is touched outside the GIL.
    PyObject* init_ptr = init_.ptr();
    PyObject* work_ptr = work_.ptr();
    PyObject* helpers_ptr = helpers_.ptr();
    gpuslot::WorkerProgram program;
    program.init = [init_ptr, helpers_ptr](const gpuslot::WorkerDevice& device) {
      return outcome_of(py::handle(helpers_ptr).attr("_run_init")(py::handle(init_ptr), device.device, device_dict(device)));
    };
    program.work = [work_ptr, helpers_ptr](std::string_view payload) {
      return outcome_of(py::handle(helpers_ptr).attr("_run_task")(py::handle(work_ptr), py::bytes(payload.data(), payload.size())));
    };
    program.before_exit = [helpers_ptr] {
      try {
        py::handle(helpers_ptr).attr("_before_exit")();
      } catch (py::error_already_set&) {
      }
    };
    program.fork_process = fork_for_python;
    pool_ = unwrap(gpuslot::WorkerPool::create(std::move(options), std::move(program)));
  }

  ~PoolHandle() {
    py::gil_scoped_release released;  // the dispatcher may need the GIL to finish
    pool_.reset();
  }

  std::uint64_t submit(py::bytes payload, py::object future, py::object complete) {
    SharedObject target = share(py::make_tuple(std::move(future), std::move(complete)));
    auto id = live().submit(std::string(payload), [target](gpuslot::WorkerPool::TaskId, const gpuslot::TaskResult& result) {
      Gil gil;
      try {
        py::tuple pair = target->cast<py::tuple>();
        pair[1](pair[0], result_tuple(result));
      } catch (py::error_already_set& e) {
        e.discard_as_unraisable("gpuslot WorkerPool result delivery");
      }
    });
    return unwrap(std::move(id));
  }

  py::list map(const std::vector<std::string>& payloads) {
    std::vector<gpuslot::WorkerPool::TaskId> ids;
    for (const auto& payload : payloads) {
      auto id = live().submit(payload);
      if (!id) {
        live().cancel(ids);
        raise_error(id.error());
      }
      ids.push_back(*id);
    }
    py::list results;
    for (std::size_t k = 0; k < ids.size(); ++k) {
      for (;;) {
        gpuslot::Result<std::optional<gpuslot::TaskResult>> waited = gpuslot::make_error(gpuslot::Errc::internal, "not run");
        {
          py::gil_scoped_release released;
          waited = live().wait(ids[k], 100ms);
        }
        if (!waited) raise_error(waited.error());
        if (*waited) {
          results.append(result_tuple(**waited));
          break;
        }
        if (PyErr_CheckSignals() != 0) {
          live().cancel(std::vector<gpuslot::WorkerPool::TaskId>(ids.begin() + std::ptrdiff_t(k), ids.end()));
          throw py::error_already_set();
        }
      }
    }
    return results;
  }

  void cancel(const std::vector<gpuslot::WorkerPool::TaskId>& ids) { live().cancel(ids); }

  py::list workers() {
    py::list out;
    for (const auto& worker : live().workers()) {
      py::dict entry = device_dict(worker.device);
      entry["pid"] = worker.pid;
      entry["state"] = worker.state;
      entry["tasks_done"] = worker.tasks_done;
      entry["lease_id"] = worker.lease_id;
      out.append(entry);
    }
    return out;
  }

  // (kind, message, failed_in_worker_init) or None.
  py::object failure() {
    auto error = live().failure();
    if (!error) return py::none();
    return py::make_tuple(gpuslot::errc_name(error->code), text_of(error->message), live().failed_in_worker_init());
  }

  void close(double grace_seconds) {
    if (!pool_) return;
    const auto grace = milliseconds_of(grace_seconds, "grace").value_or(2000ms);
    py::gil_scoped_release released;
    pool_->close(grace);
  }

 private:
  gpuslot::WorkerPool& live() {
    // A usage error, like I/O on a closed file (BadInput is a ValueError), not a state directory.
    if (!pool_) raise_error(gpuslot::make_error(gpuslot::Errc::bad_input, "the worker pool is closed; make a new one to run more tasks"));
    return *pool_;
  }

  py::object init_;
  py::object work_;
  py::object helpers_;
  std::unique_ptr<gpuslot::WorkerPool> pool_;  // declared last: destroyed first, before the objects it uses
};

}  // namespace

PYBIND11_MODULE(_gpuslot, m) {
  m.doc() = "gpuslot's C++ core. Use the `gpuslot` package, not this module.";

  m.def("version", [] { return std::string(gpuslot::library_version()); });
  m.def("parse_size", [](const std::string& text) { return unwrap(gpuslot::parse_size_bytes(text)); },
        "Bytes in a size such as '8G' (binary units; a bare number is MiB).");
  m.def("parse_duration", [](const std::string& text) { return double(unwrap(gpuslot::parse_duration(text)).count()) / 1000.0; },
        "Seconds in a duration such as '90', '1.5s', '250ms', '10m', '2h'.");
  m.def("looks_like_out_of_memory", [](const std::string& text) { return gpuslot::looks_like_out_of_memory(text); });

  m.def("status_json", [] {
    std::vector<std::string> warnings;
    gpuslot::Result<std::string> text = gpuslot::make_error(gpuslot::Errc::internal, "not run");
    {
      py::gil_scoped_release released;
      text = gpuslot::status_json(&warnings);
    }
    return py::make_tuple(unwrap(std::move(text)), to_list(warnings));
  });

  m.def("select_best_gpu", [](std::uint64_t memory_bytes, const std::vector<std::string>& exclude, const std::string& strategy,
                              const std::string& command) {
    gpuslot::SelectRequest request;
    request.memory_bytes = memory_bytes;
    request.exclude = exclude;
    request.strategy = strategy_of(strategy);
    request.command = command;
    gpuslot::Explanation explanation;
    gpuslot::Result<gpuslot::Selection> selection = gpuslot::make_error(gpuslot::Errc::internal, "not run");
    {
      py::gil_scoped_release released;
      selection = gpuslot::select_best_gpu(request, &explanation);
    }
    const gpuslot::Selection chosen = unwrap(std::move(selection), &explanation);
    py::dict out = explanation_dict(explanation);
    out["cuda_ordinal"] = chosen.cuda_ordinal;
    out["nvml_index"] = chosen.nvml_index;
    out["uuid"] = chosen.uuid;
    out["lease_id"] = chosen.lease_id;
    return out;
  });

  m.def("resolve_device", [](std::optional<std::string> spec, const std::string& env, std::uint64_t memory_bytes,
                             const std::string& strategy, const std::string& command) {
    gpuslot::DeviceRequest request;
    request.spec = std::move(spec);
    request.env = env;
    request.memory_bytes = memory_bytes;
    request.strategy = strategy_of(strategy);
    request.command = command;
    std::vector<std::pair<bool, std::string>> said;  // every line in order, also those before an error
    request.on_log = [&said](const std::string& line, bool warning) { said.emplace_back(warning, line); };
    gpuslot::Explanation explanation;
    gpuslot::Result<gpuslot::DeviceResolution> resolution = gpuslot::make_error(gpuslot::Errc::internal, "not run");
    {
      py::gil_scoped_release released;
      resolution = gpuslot::resolve_device(request, &explanation);
    }
    // The lines said go with the answer, or with the exception (its `log`): the package logs them.
    py::list lines;
    for (const auto& [warning, line] : said) lines.append(py::make_tuple(warning, text_of(line)));
    if (!resolution) raise_error(resolution.error(), &explanation, lines);
    const gpuslot::DeviceResolution resolved = std::move(resolution).value();
    py::dict out = explanation_dict(explanation);
    out["device"] = resolved.device;
    out["log"] = lines;
    out["nvml_index"] = resolved.nvml_index ? py::object(py::int_(*resolved.nvml_index)) : py::object(py::none());
    out["uuid"] = resolved.uuid ? py::object(py::str(*resolved.uuid)) : py::object(py::none());
    out["lease_id"] = resolved.lease_id;
    return out;
  });

  m.def("release_held_leases", [] { return gpuslot::release_held_leases(); });

  py::class_<gpuslot::GpuLease>(m, "Lease", "A reservation of GPU memory this process holds (see gpuslot.lease).")
      .def_property_readonly("id", &gpuslot::GpuLease::id)
      .def_property_readonly("nvml_indices", &gpuslot::GpuLease::nvml_indices)
      .def_property_readonly("uuids", &gpuslot::GpuLease::uuids)
      .def_property_readonly("cuda_ordinals", &gpuslot::GpuLease::cuda_ordinals)
      .def_property_readonly("reserved_bytes", &gpuslot::GpuLease::reserved_bytes)
      .def_property_readonly("held", &gpuslot::GpuLease::held)
      .def("release", &gpuslot::GpuLease::release)
      .def("hold_until_exit", &gpuslot::GpuLease::hold_until_exit);

  m.def("acquire_lease", &acquire, py::arg("memory_bytes"), py::arg("gpus"), py::arg("strategy"), py::arg("device"),
        py::arg("wait"), py::arg("timeout"), py::arg("max_utilization"), py::arg("command"), py::arg("on_pending"),
        py::arg("explanation"));

  py::class_<PoolHandle>(m, "WorkerPoolCore")
      .def(py::init<py::object, py::object, std::uint64_t, std::optional<unsigned>, unsigned, const std::string&, bool,
                    std::optional<double>, const std::string&>())
      .def("submit", &PoolHandle::submit)
      .def("map", &PoolHandle::map)
      .def("cancel", &PoolHandle::cancel)
      .def("workers", &PoolHandle::workers)
      .def("failure", &PoolHandle::failure)
      .def("close", &PoolHandle::close);
}
