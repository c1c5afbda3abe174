// Errors raised by the native core. Each kind maps one-to-one onto a Python
// exception class of moeoffload.errors (the binding translates by name), so a
// caller gets a named error that says what to do, never a bare runtime_error.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>

namespace moeoffload {

enum class ErrorKind {
  Codec,             // CodecError: the base of every codec failure
  CorruptData,       // CorruptDataError: truncated, corrupted or foreign buffer
  FormatVersion,     // FormatVersionError: a format version this build does not read
  NonFinite,         // NonFiniteError: NaN or Inf in the input
  InvalidBound,      // InvalidBoundError: eb <= 0, NaN or Inf
  BoundTooSmall,     // BoundTooSmallError: quantised values overflow their field
  UnsupportedDtype,  // UnsupportedDtypeError
  Shape,             // ShapeError: shape/size mismatch between arguments
  Cuda,              // CudaError: a CUDA runtime call failed
  InvalidArgument,   // InvalidArgumentError: an argument out of its range
  Budget,            // BudgetError: a cache budget that cannot hold one expert
  CacheFull,         // CacheFullError: every slot is in use or in flight
  Closed,            // ClosedError: the object was closed
  Timeout,           // TimeoutError: a wait ran past its limit
  Table,             // TableError: a table (manifest or file) is inconsistent
  TableChanged,      // TableChangedError: a mapped table file changed on disk
  Forked,            // ForkedError: a runtime object used in a child after fork()
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& what) : std::runtime_error(what), kind_(kind) {}
  ErrorKind kind() const { return kind_; }
  // Name of the Python class in moeoffload.errors.
  const char* python_name() const {
    switch (kind_) {
      case ErrorKind::CorruptData: return "CorruptDataError";
      case ErrorKind::FormatVersion: return "FormatVersionError";
      case ErrorKind::NonFinite: return "NonFiniteError";
      case ErrorKind::InvalidBound: return "InvalidBoundError";
      case ErrorKind::BoundTooSmall: return "BoundTooSmallError";
      case ErrorKind::UnsupportedDtype: return "UnsupportedDtypeError";
      case ErrorKind::Shape: return "ShapeError";
      case ErrorKind::Cuda: return "CudaError";
      case ErrorKind::InvalidArgument: return "InvalidArgumentError";
      case ErrorKind::Budget: return "BudgetError";
      case ErrorKind::CacheFull: return "CacheFullError";
      case ErrorKind::Closed: return "ClosedError";
      case ErrorKind::Timeout: return "WaitTimeoutError";
      case ErrorKind::Table: return "TableError";
      case ErrorKind::TableChanged: return "TableChangedError";
      case ErrorKind::Forked: return "ForkedError";
      case ErrorKind::Codec: break;
    }
    return "CodecError";
  }

 private:
  ErrorKind kind_;
};

// A number as %.6g, for messages (std::to_string prints 1e-7 as 0.000000).
inline std::string fmt_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

}  // namespace moeoffload
