# usage: span.py DIR PAUSE_US RESUME_US: first and last sample (ms after the pause) of every thread of the profiled ferry processes
import sys,subprocess,re,collections
tag,p0,p1=sys.argv[1],int(sys.argv[2])/1e6,int(sys.argv[3])/1e6
procs=dict(l.split() for l in open(f'{tag}/procs.txt'))
out=subprocess.run(['perf','script','-i',f'{tag}/perf-all.data','-F','pid,tid,comm,time'],capture_output=True,text=True).stdout
sp=collections.defaultdict(list)
for l in out.splitlines():
    m=re.match(r'\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):',l)
    if not m: continue
    pid=m.group(2); t=float(m.group(4))
    if pid in procs and p0-0.3<=t<=p1+0.1:
        sp[(procs[pid],m.group(1),m.group(3))].append((t-p0)*1000)
for k in sorted(sp):
    v=sp[k]; inw=[x for x in v if 0<=x<=(p1-p0)*1000]
    print(f'{k[0]} {k[1]:16} {k[2]:6} n={len(v):3} inwin={len(inw):3} first={min(v):7.0f} last={max(v):7.0f} ms')
print('resume at', (p1-p0)*1000)
