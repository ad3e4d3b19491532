# Lines per second through `procluster run`'s output: one worker prints N
# lines (seq) and then END; the primary's stdout is read here as fast as
# Python reads. Reports lines received, the time from the first to END,
# and the lines the primary says it lost (status --json, output_lost).
import json, subprocess, sys, time, os, tempfile
binary, n = sys.argv[1], int(sys.argv[2])
control = os.path.join(tempfile.mkdtemp(), "c.sock")
p = subprocess.Popen([binary, "run", "-w", "1", "--control", control, "--",
                      "sh", "-c", "seq 1 %d; echo END; exec sleep 1000" % n],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=1 << 20)
count, first = 0, None
for line in p.stdout:
    if first is None:
        first = time.monotonic()
    if line.endswith(b"END\n"):
        break
    count += 1
elapsed = time.monotonic() - first
status = subprocess.run([binary, "status", "--json", "--control", control], capture_output=True)
lost = json.loads(status.stdout).get("output_lost", {}).get("stdout", "n/a") if status.returncode == 0 else "n/a"
p.kill(); p.wait()
print("%d of %d lines in %.2f s: %.0f lines/s, lost %s" % (count, n, elapsed, count / elapsed, lost))
