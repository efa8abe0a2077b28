"""The first Python code of every sandboxed process (sandbox.py copies this file to /sandbox/harness.py).

It runs as a script (``python -I -S -B /sandbox/harness.py MODE ...``) and imports only modules built
into the interpreter, so it starts fast and hands the program nothing new. Three modes:

- ``run``: the program alone (stdin/stdout tests). After the program returned, the grader's token is
  spliced from one pipe into another (it never enters the process's memory): an early exit by any
  route leaves the grader without it.
- ``program``: the program's process of an assert run. It runs the program, announces the program's
  top-level names, then forks one child per test case (each test sees the program as its top level
  left it, as when every test ran in a process of its own); the child answers the test process's
  calls with *values*, the parent reports how each child ended ("died" frames: a crash or a timeout).
- ``test``: the test process. Each test's code runs with stand-ins for the program's names that
  forward calls and decode the answers; one verdict line per test goes to a file only this process
  and the grader hold. The program's process never sees the test code, the verdict, or this process.

Everything the program sends crosses a strict codec: None, bool, int, float, str, bytes and lists,
tuples, dicts, sets and frozensets of those, exact types only (no subclass: its ``__eq__`` would run
in the test process), depth and size capped, recursive structures refused. Objects the codec does not
carry but that a test may still drive cross as opaque handles: instances of classes the program
defined, functions and methods, iterators and generators (consumed item by item, each item a value).
In the test process a handle can be called, iterated, measured (``len``), indexed, printed (``str``)
and have its attributes read, each one a call answered with a value; it can never be compared, hashed
by value or truth-tested (those are the "always equal" routes): doing so fails the test. Arguments
cross as copies; lists, dicts and sets among them come back as they are after the call and replace
the test's contents, so functions that work in place can be tested.
"""

import builtins
import os
import resource
import select
import sys
import time

MAX_DEPTH = 100
MAX_ITEMS = 250_000  # pure-Python encoding: about a second at the limit on a busy core
MAX_FRAME = 16 << 20
MAX_NAMES = 8  # class names carried by an object handle (its program-defined MRO)
_CPU_LIMIT = -1  # RLIMIT_CPU of this sandbox, in seconds (-1: none); set by main()
_HEAP = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class written in Python (by the program)
_VALUE_TYPES = (int, float, str, bytes, list, tuple, dict, set, frozenset, bool, complex, bytearray)
_CONTAINERS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z", dict: b"d"}
_FROM_TAG = {v: k for k, v in _CONTAINERS.items()}


class CodecError(Exception):
    """A value the codec does not carry, or bytes that are no frame of it."""


def describe(v) -> str:
    """What a refused value is, for the reason of a failed test (never calls the value's methods)."""
    t = type(v)
    try:
        name = type.__getattribute__(t, "__name__")
        for base in type.__getattribute__(t, "__mro__")[1:]:
            if base in _VALUE_TYPES:
                return f"a {name} (a subclass of {base.__name__})"
        return f"a {name} object"
    except Exception:
        return "an object of an unnamed type"


def encode(value, handle=None) -> bytes:
    """``value`` as codec bytes. ``handle(v)`` encodes what is no value (the program's side makes a
    handle, the test's side refers to one) or raises CodecError; without it such a value is refused."""
    out = bytearray()
    path = set()
    count = 0

    def enc(v, depth):
        nonlocal count
        if depth > MAX_DEPTH:
            raise CodecError(f"a structure nested deeper than {MAX_DEPTH} levels")
        count += 1
        if count > MAX_ITEMS or len(out) > MAX_FRAME:
            raise CodecError(f"a value over the size limit ({MAX_ITEMS} items, {MAX_FRAME >> 20} MiB)")
        t = type(v)
        if v is None:
            out.extend(b"N")
        elif t is bool:
            out.extend(b"T" if v else b"F")
        elif t is int:
            b = v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)
            out.extend(b"i" + len(b).to_bytes(4, "big") + b)
        elif t is float:
            b = v.hex().encode()
            out.extend(b"f" + bytes([len(b)]) + b)
        elif t is str or t is bytes:
            b = v.encode("utf-8", "surrogatepass") if t is str else v
            out.extend((b"s" if t is str else b"b") + len(b).to_bytes(4, "big") + b)
        elif t in _CONTAINERS:
            if id(v) in path:
                raise CodecError("a recursive structure (it contains itself)")
            path.add(id(v))
            out.extend(_CONTAINERS[t] + len(v).to_bytes(4, "big"))
            if t is dict:
                for k, x in dict.items(v):
                    enc(k, depth + 1)
                    enc(x, depth + 1)
            else:
                for x in v:
                    enc(x, depth + 1)
            path.discard(id(v))
        elif handle is not None:
            out.extend(handle(v))
        else:
            raise CodecError(f"{describe(v)}, which is not a value")

    enc(value, 0)
    if len(out) > MAX_FRAME:
        raise CodecError(f"a value over the size limit ({MAX_FRAME >> 20} MiB)")
    return bytes(out)


def decode(data: bytes, handle=None):
    """The value of codec bytes; ``handle(kind, id, names)`` makes what a handle tag stands for."""
    pos, count = 0, 0

    def take(n):
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise CodecError("a truncated frame")
        b = data[pos:pos + n]
        pos += n
        return b

    def u32():
        return int.from_bytes(take(4), "big")

    def dec(depth):
        nonlocal count
        count += 1
        if depth > MAX_DEPTH or count > MAX_ITEMS:
            raise CodecError("a frame nested too deep or too large")
        tag = take(1)
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"i":
            return int.from_bytes(take(u32()), "big", signed=True)
        if tag == b"f":
            return float.fromhex(take(take(1)[0]).decode("ascii"))
        if tag == b"s":
            return take(u32()).decode("utf-8", "surrogatepass")
        if tag == b"b":
            return take(u32())
        if tag in _FROM_TAG:
            t, n = _FROM_TAG[tag], u32()
            if n > len(data) - pos:
                raise CodecError("a truncated frame")
            if t is dict:
                return {dec(depth + 1): dec(depth + 1) for _ in range(n)}
            items = [dec(depth + 1) for _ in range(n)]
            return items if t is list else t(items)
        if tag == b"H" and handle is not None:
            kind, ident = take(1).decode("ascii"), u32()
            names = tuple(take(take(1)[0]).decode("utf-8") for _ in range(min(take(1)[0], MAX_NAMES)))
            return handle(kind, ident, names)
        raise CodecError(f"an unknown tag {tag!r}")

    try:
        value = dec(0)
    except CodecError:
        raise
    except (ValueError, TypeError, UnicodeError, OverflowError, RecursionError, MemoryError) as e:
        raise CodecError(f"a malformed frame ({type(e).__name__})") from None
    if pos != len(data):
        raise CodecError("bytes after the end of a frame")
    return value


def handle_bytes(kind: str, ident: int, names=()) -> bytes:
    names = [n.encode("utf-8", "replace")[:100] for n in names][:MAX_NAMES]
    return b"H" + kind.encode() + ident.to_bytes(4, "big") + bytes([len(names)]) + b"".join(
        bytes([len(n)]) + n for n in names)


def write_frame(fd: int, payload: bytes, deadline=None):
    data = memoryview(len(payload).to_bytes(4, "big") + payload)
    while data:
        if deadline is not None:
            _wait(fd, select.POLLOUT, deadline)
        data = data[os.write(fd, data):]


def _wait(fd, event, deadline):
    left = deadline - _now()
    poller = select.poll()
    poller.register(fd, event)
    if left <= 0 or not poller.poll(left * 1000):
        raise TimeoutError


def _now():
    return time.monotonic()


def read_frame(fd: int, deadline=None) -> bytes:
    """One frame; EOFError when the writer is gone, TimeoutError past ``deadline``, CodecError when
    the length announced is over the limit."""
    def exactly(n):
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                _wait(fd, select.POLLIN, deadline)
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf.extend(chunk)
        return bytes(buf)

    n = int.from_bytes(exactly(4), "big")
    if n > MAX_FRAME + 4096:
        raise CodecError(f"a frame of {n} bytes, over the limit")
    return exactly(n)


# ---- the program's process ---------------------------------------------------------------------


def _program_class(t) -> bool:
    """A class the program wrote, with no built-in base but object (its instances become handles)."""
    try:
        mro = type.__getattribute__(t, "__mro__")
        return mro[-1] is object and all(type.__getattribute__(c, "__flags__") & _HEAP for c in mro[:-1])
    except Exception:
        return False


def _exception_payload(e, handle):
    names = [c.__name__ for c in type(e).__mro__ if isinstance(c.__name__, str)][:16]
    try:
        args = tuple(e.args)
        encode(args)
    except Exception:
        try:
            args = (str(e)[:2000],)
        except Exception:
            args = ("(the exception's message could not be read)",)
    return (tuple(names), args)


def _serve_program(source, call_r, answer_w, wall):
    import types

    table, functions = {}, (types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                            types.BuiltinMethodType, types.MethodWrapperType, types.WrapperDescriptorType)

    def register(v):
        ident = len(table) + 1
        table[ident] = v
        return ident

    def handle(v):
        t = type(v)
        if isinstance(v, functions):
            return handle_bytes("f", register(v))
        if isinstance(v, type):
            return handle_bytes("c", register(v), [c.__name__ for c in v.__mro__[:-1] if _program_class(c)])
        if _program_class(t):  # an iterator class of the program is iterated like a generator
            return handle_bytes("i" if hasattr(t, "__next__") else "o", register(v),
                                [c.__name__ for c in t.__mro__[:-1]])
        if not t.__flags__ & _HEAP and hasattr(t, "__next__"):  # generators, map, zip, iterators
            return handle_bytes("i", register(v))
        raise CodecError(f"{describe(v)}, which is not a value")

    g = {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), g)
    except BaseException as e:
        write_frame(answer_w, encode((-1, b"", "raise", _exception_payload(e, handle), None)))
        return
    for stream in (sys.stdout, sys.stderr):  # or a child would print the top level's output again
        try:
            stream.flush()
        except Exception:
            pass
    entries, size = [], 0
    for name, v in list(g.items()):
        if name.startswith("__") or type(name) is not str:
            continue
        if isinstance(v, types.ModuleType):
            entries.append((name, "m", str(v.__name__)))
        elif isinstance(v, type) and issubclass(v, BaseException):
            entries.append((name, "e", tuple(c.__name__ for c in v.__mro__)[:16]))
        else:
            try:
                size += len(encode(v, handle))
                if size > MAX_FRAME // 2:
                    raise CodecError("too large to send with the program's top-level names")
                entries.append((name, "v", v))
            except CodecError as e:
                entries.append((name, "x", f"{describe(v)}: {e}"))
    write_frame(answer_w, encode((-1, b"", "ready", tuple(entries), None), handle))
    test = 0
    while True:
        pid = os.fork()
        if pid == 0:
            _serve_test_calls(test, table, handle, call_r, answer_w)
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        timed_out = not poller.poll(wall * 1000)
        if timed_out:
            os.kill(pid, 9)
        status, usage = os.wait4(pid, 0)[1:]
        os.close(pidfd)
        if timed_out:
            why = f"timed out after {wall:g}s"
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            # SIGXCPU at the soft limit, SIGKILL at the hard one a second later if the program
            # ignored it: either way the reason is the CPU limit, which the CPU time shows.
            cpu_out = sig == 24 or (sig == 9 and _CPU_LIMIT > 0 and usage.ru_utime + usage.ru_stime >= _CPU_LIMIT)
            why = (f"exceeded the CPU limit of {_CPU_LIMIT}s (killed by signal {sig})" if cpu_out else
                   f"the program's process was killed by signal {sig}")
        else:
            why = f"the program's process exited (status {os.WEXITSTATUS(status)}) during the test"
        try:
            write_frame(answer_w, encode((test, b"", "died", why, None)))
        except BrokenPipeError:  # the test process is done
            return
        test += 1


def _exit(status):
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def _serve_test_calls(test, table, handle, call_r, answer_w):
    """One test's calls, in a child forked from the program as its top level left it."""
    def resolve(kind, ident, names):
        if ident not in table:
            raise CodecError(f"no program object #{ident}")
        return table[ident]

    while True:
        try:
            frame = decode(read_frame(call_r), resolve)
        except EOFError:
            _exit(0)
        i, nonce, op, target, name, args, kwargs = frame
        if i < test:
            continue  # left over from a test that timed out
        if op == "end" or i > test:
            _exit(0)
        try:
            obj = table[target]
            if op == "call":
                answer = ("ok", obj(*args, **kwargs))
            elif op == "callattr":  # a protocol (len, [], in, iter, str): looked up on the type
                method = getattr(type(obj), name, None)
                if method is None:
                    raise TypeError(f"{describe(obj)} has no {name}")
                answer = ("ok", method(obj, *args, **kwargs))
            elif op == "get":
                answer = ("ok", getattr(obj, name))
            else:
                try:
                    answer = ("ok", next(obj))
                except StopIteration:
                    answer = ("stop", None)
        except BaseException as e:
            answer = ("raise", _exception_payload(e, handle))
        # Lists, dicts and sets passed to the program go back as they are after the call, so a test
        # of a function that works in place sees its effect (as values, like everything else).
        back = None
        if answer[0] == "ok" and any(type(a) in (list, dict, set) for a in args):
            back = tuple(a if type(a) in (list, dict, set) else None for a in args)
            try:
                encode(back, handle)
            except CodecError:
                back = None
        try:
            data = encode((i, nonce) + answer + (back,), handle)
        except CodecError as e:
            data = encode((i, nonce, "bad", str(e), None))
        write_frame(answer_w, data)


# ---- the test process ----------------------------------------------------------------------------


class ProgramError(Exception):
    """An exception the program raised whose type has no counterpart in the test process."""


class _Refused(BaseException):
    """The test touched what cannot cross (a BaseException: test code's ``except Exception`` does
    not swallow it, and the failure is also recorded)."""


class _Broken(BaseException):
    """The connection to the program's process is unusable: this test and the rest fail."""


class _Died(BaseException):
    """The program's child for this test ended (crash, timeout): this test fails, the next go on."""


class _Connection:
    def __init__(self, call_w, answer_r, wall):
        self.call_w, self.answer_r, self.wall = call_w, answer_r, wall
        self.test, self.deadline, self.failed, self.broken = -1, 0.0, None, None
        self.exceptions = {}
        os.set_blocking(call_w, False)

    def refuse(self, reason):
        self.failed = self.failed or reason
        raise _Refused(reason)

    def _read(self):
        try:
            frame = decode(read_frame(self.answer_r, self.deadline), self.make_handle)
        except TimeoutError:
            self._break(f"timed out after {self.wall + 2:g}s: the program's process did not answer")
        except EOFError:
            self._break("the program's process ended")
        except CodecError as e:
            self._break(f"the program sent {e}")
        if type(frame) is not tuple or len(frame) != 5 or type(frame[0]) is not int or type(frame[2]) is not str:
            self._break("the program sent a frame that is no answer")
        return frame

    def _break(self, reason):
        self.broken = self.broken or reason
        raise _Broken(self.broken)

    def ready(self):
        self.deadline = _now() + self.wall + 2
        try:
            i, _, status, payload, _ = self._read()
        except _Broken:
            if self.broken.startswith("timed out"):
                self.broken = f"timed out after {self.wall + 2:g}s: the program's top level did not finish"
            raise
        if status == "raise":
            self._break(f"the program raised {self.exception(payload)!r} at its top level")
        if i != -1 or status != "ready" or type(payload) is not tuple:
            self._break("the program sent a frame it was not asked for")
        return payload

    def pending(self):
        """Frames that arrived while no call was open: stale ones of ended tests are dropped."""
        poller = select.poll()
        poller.register(self.answer_r, select.POLLIN)
        while poller.poll(0):
            i, nonce, status, payload, _ = self._read()
            if i < self.test:
                continue
            if status == "died":
                self.died(payload)
            self._break("the program sent an answer to a call it was not asked")

    def died(self, why):
        self.failed = self.failed or (why if type(why) is str else "the program's process ended")
        raise _Died(self.failed)

    def call(self, op, target, name=None, args=(), kwargs=None):
        if self.broken:
            raise _Broken(self.broken)
        self.pending()
        nonce = os.urandom(8)
        try:
            frame = encode((self.test, nonce, op, target, name, tuple(args), dict(kwargs or {})), self.handle_ref)
        except CodecError as e:
            self.refuse(f"an argument of a call to the program does not cross: {e}")
        try:
            write_frame(self.call_w, frame, self.deadline)
        except TimeoutError:
            self._break(f"the program did not take a call within {self.wall + 2:g}s")
        except BrokenPipeError:
            self._break("the program's process ended")
        while True:
            i, got, status, payload, back = self._read()
            if i < self.test:
                continue
            if status == "died":
                self.died(payload)
            if i != self.test or got != nonce:
                self._break("the program sent an answer to a call it was not asked")
            break
        if status == "ok":
            if type(back) is tuple and len(back) == len(args):
                for sent, now in zip(args, back):
                    if type(sent) is list and type(now) is list:
                        sent[:] = now
                    elif type(sent) in (dict, set) and type(now) is type(sent):
                        sent.clear()
                        sent.update(now)
            return payload
        if status == "stop":
            raise StopIteration
        if status == "raise":
            raise self.exception(payload)
        if status == "bad" and type(payload) is str:
            self.refuse(f"the program returned {payload}")
        self._break("the program sent an answer of no known kind")

    def end(self):
        if not self.broken:
            try:
                write_frame(self.call_w, encode((self.test, b"", "end", 0, None, (), {})), self.deadline)
            except (TimeoutError, BrokenPipeError):
                self.broken = "the program's process ended"

    def exception(self, payload):
        try:
            names, args = payload
            names = [n for n in names if type(n) is str][:16]
        except (TypeError, ValueError):
            return ProgramError("an exception the program described in no known way")
        for n in names:
            cls = self.exceptions.get(n) or getattr(builtins, n, None) if n.isidentifier() else None
            if isinstance(cls, type) and issubclass(cls, Exception):
                try:
                    return cls(*args)
                except Exception:
                    continue
        return ProgramError(f"{names[0] if names else '?'}: {args}")

    def make_handle(self, kind, ident, names):
        cls = {"o": ProgramObject, "f": ProgramObject, "c": ProgramClass, "i": ProgramIterator}.get(kind)
        if cls is None:
            raise CodecError(f"an unknown handle kind {kind!r}")
        h = object.__new__(cls)
        for slot, value in (("_id", ident), ("_kind", kind), ("_names", names)):
            object.__setattr__(h, slot, value)
        return h

    @staticmethod
    def handle_ref(v):
        if isinstance(v, _Handle):
            get = object.__getattribute__
            return handle_bytes(get(v, "_kind"), get(v, "_id"), get(v, "_names"))
        raise CodecError(f"{describe(v)}, which is not a value")


_CONN = None


def _forward(op, h, name=None, args=(), kwargs=None):
    return _CONN.call(op, object.__getattribute__(h, "_id"), name, args, kwargs)


class _Handle:
    """What stands for an object that lives in the program's process: it is driven only through calls
    answered with values, and never compared, hashed by value or truth-tested."""

    __slots__ = ("_id", "_kind", "_names")

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _forward("get", self, name)

    def __setattr__(self, name, value):
        raise TypeError("attributes of program objects cannot be set from the test (call a method)")

    def __repr__(self):
        names = object.__getattribute__(self, "_names")
        kind = {"f": "function", "c": "class", "i": "iterator"}.get(object.__getattribute__(self, "_kind"), "object")
        return f"<program {kind}{' ' + names[0] if names else ''}>"

    def _refuse(self, *_):
        _CONN.refuse(f"the test compared or truth-tested {self!r}: objects of the program are not values "
                     "(return lists, tuples, dicts, numbers or strings, or test through their methods)")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = _refuse
    __hash__ = object.__hash__


class ProgramObject(_Handle):
    """An instance of a program class, a function or a method of the program."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        return _forward("call", self, None, args, kwargs)

    def __len__(self):
        return _forward("callattr", self, "__len__")

    def __getitem__(self, key):
        return _forward("callattr", self, "__getitem__", (key,))

    def __contains__(self, item):
        return _forward("callattr", self, "__contains__", (item,))

    def __iter__(self):
        return _forward("callattr", self, "__iter__")

    def __str__(self):
        return _forward("callattr", self, "__str__")


class ProgramClass(ProgramObject):
    """A class of the program: calling it makes an instance in the program's process."""

    __slots__ = ()

    def __instancecheck__(self, obj):
        names = object.__getattribute__(self, "_names")
        return isinstance(obj, _Handle) and bool(names) and names[0] in object.__getattribute__(obj, "_names")


class ProgramIterator(_Handle):
    """An iterator or generator of the program: each ``next`` is a call, each item a value."""

    __slots__ = ()

    def __iter__(self):
        return self

    def __next__(self):
        return _forward("next", self)


class _Uncrossable:
    """A top-level name of the program whose value cannot cross: any use fails the test, saying why."""

    def __init__(self, name, reason):
        self.why = f"the program's {name} does not cross: {reason}"

    def _refuse(self, *_, **__):
        _CONN.refuse(self.why)

    __call__ = __eq__ = __ne__ = __bool__ = __len__ = __iter__ = __getitem__ = __contains__ = _refuse
    __hash__ = object.__hash__

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()


def _builtin_exception(names):
    for n in names:
        cls = getattr(builtins, n, None) if type(n) is str and n.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls
    return Exception


# Standard modules whose import does something (opens a browser, a window, prints): a program's
# `import this` is not repeated in the test process.
_NOT_IMPORTED = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser", "pydoc"}


def _stand_ins(conn, entries) -> dict:
    """The test's view of the program's top-level names. Built-in names are never shadowed (a
    program's own ``all`` or ``isinstance`` would otherwise decide the test)."""
    g = {}
    for entry in entries[:10000]:
        if type(entry) is not tuple or len(entry) != 3 or type(entry[0]) is not str or type(entry[1]) is not str:
            continue
        name, kind, payload = entry
        if not name.isidentifier() or name.startswith("__") or hasattr(builtins, name):
            continue
        if kind == "v":
            g[name] = payload
        elif kind == "x" and type(payload) is str:
            g[name] = _Uncrossable(name, payload[:300])
        elif kind == "m" and type(payload) is str and payload in sys.stdlib_module_names and \
                payload not in _NOT_IMPORTED:
            try:
                g[name] = __import__(payload)
            except Exception:
                pass
        elif kind == "e" and type(payload) is tuple:
            base = _builtin_exception(payload)
            g[name] = conn.exceptions[name] = type(name, (base,), {"__module__": "program"})
    return g


def _where(e, lines) -> str:
    tb, line = e.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "test.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None or not 0 < line <= len(lines):
        return ""
    return f" at line {line}: {lines[line - 1].strip()[:120]}"


def _serve_tests(tests, call_w, answer_r, verdict_fd, wall):
    global _CONN
    conn = _CONN = _Connection(call_w, answer_r, wall)
    entries_frame = None
    try:
        entries = conn.ready()
    except _Broken:
        pass
    else:
        entries_frame = encode(entries, conn.handle_ref)  # decoded afresh for each test

    for i, source in enumerate(tests):
        conn.test, conn.failed = i, None
        conn.deadline = _now() + wall + 2
        reason = None
        if conn.broken:
            reason = conn.broken
        else:
            lines = source.splitlines()
            g = {"__name__": "__main__", "__builtins__": builtins}
            try:
                g.update(_stand_ins(conn, decode(entries_frame, conn.make_handle)))
                exec(compile(source, "test.py", "exec"), g)
            except (_Broken, _Died, _Refused) as e:
                reason = str(e)
            except BaseException as e:
                message = str(e).replace("\n", " ")[:160]
                reason = f"{type(e).__name__}{': ' + message if message else ''}{_where(e, lines)}"
            reason = conn.broken or conn.failed or reason
            conn.end()
        os.write(verdict_fd, b"P\n" if reason is None else b"F " + reason.replace("\n", " ")[:300].encode(
            "utf-8", "replace") + b"\n")


# ---- entry ---------------------------------------------------------------------------------------


def _audit(root):
    # rlimits-only mode: a Python-level guard that a child process or ctypes walks around.
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(p):
        try:
            p = os.fsdecode(p) if not isinstance(p, int) else None
        except Exception:
            return False
        if p is None:
            return True
        p = os.path.realpath(os.path.join(root, p))
        return p == root or p.startswith(root + os.sep)

    def hook(event, args):
        if event.startswith("socket.") or event == "_socket.__new__":
            raise PermissionError("network access is disabled in the sandbox")
        if event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid(), os.getpgid(0)):
            raise PermissionError("signalling other processes is disabled in the sandbox")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE)
            if writing and not inside(path):
                raise PermissionError(f"writing outside the scratch directory is disabled: {path}")
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                       "os.chmod", "os.chown", "os.truncate", "shutil.rmtree", "shutil.move",
                       "shutil.copyfile", "os.utime"):
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if event in ("shutil.copyfile", "os.symlink", "os.link") and paths:
                paths = paths[1:]
            if event == "os.rename" and paths:
                paths = paths[:2]
            for p in paths:
                if not inside(p):
                    raise PermissionError(f"{event} outside the scratch directory is disabled: {p}")
    sys.addaudithook(hook)


def _run_alone(code, tok, out):
    """The ``run`` mode: the program, then the token (see the module docstring)."""
    splice, stdout, stderr = os.splice, sys.stdout, sys.stderr
    exec(code, {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins})
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except Exception:
            pass
    splice(tok, out, 64)


def main(argv):
    mode, cpu, mem, nproc, fsize, weak, src = argv[1], *map(int, argv[2:8])
    rest = [float(a) if "." in a else int(a) for a in argv[8:]]
    global _CPU_LIMIT
    _CPU_LIMIT = cpu
    for lim, v in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                   (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, nproc)):
        if v >= 0:
            resource.setrlimit(lim, (v, v))
    if cpu >= 0:
        # With soft == hard the kernel sends SIGKILL at the limit, which reads like any other
        # kill; SIGXCPU at the soft limit names the cause, and the hard limit a second later
        # stops a program that catches it.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    # The code comes through an unlinked file, closed before anything runs: nothing of it has a
    # name that could be opened.
    with os.fdopen(src, "rb") as f:
        data = f.read()
    if weak:
        _audit(os.path.realpath(os.getcwd()))
    del argv[:]
    sys.argv = ["program.py"]
    if mode == "test":
        call_w, answer_r, verdict_fd, wall = rest
        tests = decode(data)
        del data
        _serve_tests(tests, call_w, answer_r, verdict_fd, wall)
        return
    if mode == "run":
        code = compile(data, "program.py", "exec")
        del data
        _run_alone(code, *rest)
    else:
        call_r, answer_w, wall = rest
        _serve_program(data, call_r, answer_w, wall)
        _exit(0)


if __name__ == "__main__":
    main(sys.argv)
