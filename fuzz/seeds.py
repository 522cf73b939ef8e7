"""Writes the seed corpus of every fuzz target under fuzz/corpus/.

Run from fuzz/ (`python3 seeds.py`); needs GNU tar. The seeds are
committed; this shows how they were made (tar headers carry times, so
the tars come out slightly different each run).
"""
import io, os, struct, subprocess, tarfile, tempfile, json

def put(target, name, data):
    with open(f"corpus/{target}/{name}", "wb") as f:
        f.write(data)

# erofs_convert: flag byte + tar, record size 512 so no padding beyond the end blocks.
def gnutar(fmt, build):
    with tempfile.TemporaryDirectory() as d:
        build(d)
        out = subprocess.run(["tar", "-C", d, f"--format={fmt}", "-b", "1", "--sort=name",
                              "--owner=0", "--group=0", "--mtime=@0", "-cf", "-", "."],
                             check=True, capture_output=True).stdout
    return out

def tree(d):
    os.makedirs(f"{d}/etc/app")
    open(f"{d}/etc/app/conf", "w").write("key = 1\n")
    os.symlink("app/conf", f"{d}/etc/link")
    os.link(f"{d}/etc/app/conf", f"{d}/etc/hard")
    open(f"{d}/.wh.gone", "w").close()
    open(f"{d}/etc/.wh..wh..opq", "w").close()

def longname(d):
    p = f"{d}/" + "/".join(["d" * 60] * 2)
    os.makedirs(p)
    open(f"{p}/" + "f" * 90, "w").write("x")

def sparse(d):
    with open(f"{d}/holes", "wb") as f:
        f.seek(64 << 10); f.write(b"data"); f.seek(128 << 10); f.write(b"end")

put("erofs_convert", "gnu-tree", b"\x00" + gnutar("gnu", tree))
put("erofs_convert", "pax-longname", b"\x00" + gnutar("posix", longname))
with tempfile.TemporaryDirectory() as d:
    sparse(d)
    sp = subprocess.run(["tar", "-C", d, "--format=posix", "--sparse", "-b", "1", "--owner=0",
                         "--group=0", "--mtime=@0", "-cf", "-", "holes"],
                        check=True, capture_output=True).stdout
put("erofs_convert", "pax-sparse", b"\x00" + sp)

# EROFS-relevant: xattrs (inline xattr area), device nodes, fifo, modes, many entries in one dir.
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    def add(name, type_=tarfile.REGTYPE, data=b"", **kw):
        ti = tarfile.TarInfo(name); ti.type = type_; ti.size = len(data); ti.mtime = 0
        ti.mode = kw.pop("mode", 0o644)
        for k, v in kw.items(): setattr(ti, k, v)
        t.addfile(ti, io.BytesIO(data) if data else None)
    add("bin", tarfile.DIRTYPE, mode=0o755)
    add("bin/sh", data=b"\x7fELF", mode=0o4755,
        pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                     "SCHILY.xattr.user.note": "v" * 40,
                     "SCHILY.xattr.trusted.overlay.opaque": "y"})
    add("dev", tarfile.DIRTYPE, mode=0o755)
    add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)
    add("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0)
    add("dev/fifo", tarfile.FIFOTYPE)
    for i in range(4):
        add(f"bin/tool{i:02}", tarfile.SYMTYPE, linkname="sh")
    add("bin/sh2", tarfile.LNKTYPE, linkname="bin/sh")
def trim(b):
    while len(b) >= 512 and b[-512:] == bytes(512): b = b[:-512]
    return b + bytes(1024)
put("erofs_convert", "pax-xattr-devices", b"\x01" + trim(buf.getvalue()))

# registry_index
h = "a" * 64
ix = {"version": 1, "chunk_size": 1048576,
      "layers": [{"layer": "sha256:" + h, "erofs": "sha256:" + "b" * 64, "size": 1048577,
                  "data_end": 8192, "chunks": ["0" * 64, "f" * 64]}]}
put("registry_index", "two-chunks.json", json.dumps(ix).encode())
put("registry_index", "empty.json", b'{"version":1,"chunk_size":4096,"layers":[]}')

# nri_mux: frames on the plugin and runtime connections.
def frame(conn, payload): return struct.pack(">II", conn, len(payload)) + payload
put("nri_mux", "two-frames", frame(1, b"hello") + frame(2, b""))
put("nri_mux", "truncated", frame(2, b"abcdef")[:10])

# nri_ttrpc: cut byte + ttrpc messages (protobuf hand-encoded).
def pb_bytes(tag, b): return bytes([tag << 3 | 2, len(b)]) + b
def ttrpc(stream, kind, body): return struct.pack(">IIBB", len(body), stream, kind, 0) + body
conf = pb_bytes(1, b"{}") + pb_bytes(2, b"containerd") + pb_bytes(3, b"1.7.24")
req = pb_bytes(1, b"nri.pkg.api.v1alpha1.Plugin") + pb_bytes(2, b"Configure") + pb_bytes(3, conf)
resp = pb_bytes(1, bytes([0x08, 12]) + pb_bytes(2, b"nope")) + pb_bytes(2, b"")
put("nri_ttrpc", "request-response", b"\x02" + ttrpc(1, 1, req) + ttrpc(1, 2, resp))
put("nri_ttrpc", "too-large", b"\x00" + struct.pack(">IIBB", (4 << 20) + 1, 3, 1, 0) + b"xyz" + ttrpc(5, 1, req))

# psi_parse
put("psi_parse", "memory", b"some avg10=0.00 avg60=0.12 avg300=1.50 total=1765456\n"
                           b"full avg10=0.00 avg60=0.00 avg300=0.00 total=1246897\n")
put("psi_parse", "some-only", b"some avg10=92.10 avg60=89.30 avg300=77.95 total=1491333315\n")

# hosts_toml
put("hosts_toml", "mirror.toml", b'''server = "https://registry.test"

[host."http://mirror.local:5000"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."http://mirror.local:5000".header]
    x-custom = ["a", "b"]

[host."https://cache.local/prefix/v2"]
  capabilities = ["pull"]
  ca = ["ca.pem", "/etc/ssl/other.pem"]
  override_path = true
''')
put("hosts_toml", "top-level.toml", b'ca = "ca.crt"\nskip_verify = false\n[header]\nauthorization = "x"\n')
