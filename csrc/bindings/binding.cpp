// The binding registry and the vectorcall trampoline every entry point goes through
// (binding.h).
#include "bindings/binding.h"

#include <Python.h>

#include <cstring>
#include <deque>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

namespace nnk {

namespace {

std::vector<Binding>& registry() {
  static std::vector<Binding> r;
  return r;
}

std::vector<std::pair<const char*, int64_t>>& constants() {
  static std::vector<std::pair<const char*, int64_t>> r;
  return r;
}

Params parse(const char* op, const char* signature) {
  Params p;
  p.op = op;
  const std::string s(signature);
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    std::string item = s.substr(pos, end - pos);
    const size_t b = item.find_first_not_of(' '), e = item.find_last_not_of(' ');
    item = b == std::string::npos ? "" : item.substr(b, e - b + 1);
    if (!item.empty()) {
      if (p.n == kMaxParams) throw std::logic_error("nnkernels: too many parameters");
      const size_t eq = item.find('=');
      p.names[p.n] =
          eq == std::string::npos ? item : item.substr(0, item.find_last_not_of(' ', eq - 1) + 1);
      p.required[p.n] = eq == std::string::npos;
      ++p.n;
    }
    pos = end + 1;
  }
  return p;
}

// One entry point: its parsed signature and the function, reached from the trampoline's `self`.
struct Entry {
  Params params;
  py::object (*fn)(Call&);
  PyMethodDef def;
  std::string doc;
};

PyObject* trampoline(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  const auto* e = static_cast<const Entry*>(PyCapsule_GetPointer(self, nullptr));
  try {
    Call c(e->params, args, nargs, kwnames);
    return e->fn(c).release().ptr();
  } catch (py::error_already_set& err) {
    err.restore();
  } catch (py::builtin_exception& err) {
    err.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& err) {
    PyErr_SetString(PyExc_RuntimeError, err.what());
  }
  return nullptr;
}

}  // namespace

Call::Call(const Params& p, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) : p_(p) {
  NNK_CHECK_TYPE(nargs <= p.n, p.op, "() takes at most ", p.n, " arguments, got ", nargs);
  for (Py_ssize_t i = 0; i < nargs; ++i) a_[i] = args[i];
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    const char* kw = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
    int i = 0;
    while (i < p.n && p.names[i] != kw) ++i;
    NNK_CHECK_TYPE(i < p.n, p.op, "() got an unexpected keyword argument '", kw, "'");
    NNK_CHECK_TYPE(!a_[i], p.op, "() got multiple values for argument '", kw, "'");
    a_[i] = args[nargs + k];
  }
  for (int i = 0; i < p.n; ++i)
    NNK_CHECK_TYPE(a_[i] || !p.required[i], p.op, "() missing required argument '", p.names[i],
                   "'");
}

double Call::f64(int i, double fallback) const {
  if (!given(i)) return fallback;
  const double v = PyFloat_AsDouble(a_[i]);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    NNK_CHECK_TYPE(false, name(i), " must be a number, got ", Py_TYPE(a_[i])->tp_name);
  }
  return v;
}

int64_t Call::i64(int i, int64_t fallback) const {
  if (!given(i)) return fallback;
  NNK_CHECK_TYPE(PyLong_Check(a_[i]) && !PyBool_Check(a_[i]), name(i), " must be an int, got ",
                 Py_TYPE(a_[i])->tp_name);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(a_[i], &overflow);
  NNK_CHECK_VALUE(!overflow, name(i), " does not fit in 64 bits");
  return v;
}

bool Call::flag(int i, bool fallback) const {
  if (!given(i)) return fallback;
  NNK_CHECK_TYPE(PyBool_Check(a_[i]), name(i), " must be a bool, got ", Py_TYPE(a_[i])->tp_name);
  return a_[i] == Py_True;
}

void Call::ints_into(int i, int64_t* out, size_t n) const {
  NNK_CHECK_TYPE(given(i), name(i), " must be given as ", n, " ints");
  PyObject* o = a_[i];
  if (PyLong_Check(o) && !PyBool_Check(o)) {
    const int64_t v = i64(i, 0);
    for (size_t k = 0; k < n; ++k) out[k] = v;
    return;
  }
  NNK_CHECK_TYPE(PyTuple_Check(o) || PyList_Check(o), name(i), " must be a tuple of ", n,
                 " ints, got ", Py_TYPE(o)->tp_name);
  const Py_ssize_t len = PySequence_Fast_GET_SIZE(o);
  NNK_CHECK_VALUE(size_t(len) == n, name(i), " must have ", n, " values, got ", len);
  PyObject** items = PySequence_Fast_ITEMS(o);
  for (size_t k = 0; k < n; ++k) {
    NNK_CHECK_TYPE(PyLong_Check(items[k]) && !PyBool_Check(items[k]), name(i),
                   " must hold ints, got ", Py_TYPE(items[k])->tp_name);
    int overflow = 0;
    out[k] = PyLong_AsLongLongAndOverflow(items[k], &overflow);
    NNK_CHECK_VALUE(!overflow, name(i), " does not fit in 64 bits");
  }
}

bool add_binding(const Binding& b) {
  registry().push_back(b);
  return true;
}

bool add_constant(const char* name, int64_t value) {
  constants().emplace_back(name, value);
  return true;
}

void define_bindings(py::module_& m) {
  static std::deque<Entry> entries;  // the PyMethodDefs must outlive the module
  py::list names;
  for (const Binding& b : registry()) {
    Entry& e = entries.emplace_back();
    e.params = parse(b.name, b.signature);
    e.fn = b.fn;
    e.doc = std::string(b.name) + "(" + b.signature + ")\n\n" + b.doc;
    e.def = PyMethodDef{b.name,
                        reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&trampoline)),
                        METH_FASTCALL | METH_KEYWORDS, e.doc.c_str()};
    py::object self = py::reinterpret_steal<py::object>(PyCapsule_New(&e, nullptr, nullptr));
    py::object fn =
        py::reinterpret_steal<py::object>(PyCFunction_NewEx(&e.def, self.ptr(), m.ptr()));
    if (!fn) throw py::error_already_set();
    m.add_object(b.name, fn);
    names.append(b.name);
  }
  m.attr("entry_points") = py::tuple(names);  // nnkernels/_native.py exports these
  py::list constant_names;
  for (const auto& [name, value] : constants()) {
    m.attr(name) = value;
    constant_names.append(name);
  }
  m.attr("constants") = py::tuple(constant_names);
}

}  // namespace nnk
