import sys,subprocess,collections,re
# usage: win.py DIR PAUSE_US RESUME_US: CPU by process (DIR/procs.txt: 'pid role' lines) and thread between two CLOCK_REALTIME timestamps (µs) of DIR/perf-all.data, and the hottest leaf symbols
tag,p0,p1=sys.argv[1],int(sys.argv[2])/1e6,int(sys.argv[3])/1e6
procs={}
for l in open(f'{tag}/procs.txt'):
    a,b=l.split(); procs[a]=b
out=subprocess.run(['perf','script','-i',f'{tag}/perf-all.data','-F','pid,tid,comm,time,ip,sym'],capture_output=True,text=True).stdout
# parse: header lines "comm pid/tid time:" followed by callchain lines
by=collections.Counter(); syms=collections.defaultdict(collections.Counter); tot=collections.Counter()
cur=None; first=False
for l in out.splitlines():
    if not l.strip(): cur=None; continue
    m=re.match(r'\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):',l)
    if m:
        if not m: cur=None; continue
        comm,pid,tid,t=m.group(1),m.group(2),m.group(3),float(m.group(4))
        if not (p0<=t<=p1): cur=None; continue
        role=procs.get(pid,'other')
        tot[role]+=1
        by[(role,re.sub(r'\d+$','N',comm))]+=1
        cur=role; first=True; continue
    if cur and first:
        s=l.strip().split(None,1)
        sym=s[1] if len(s)>1 else s[0]
        syms[cur][re.sub(r'\+0x[0-9a-f]+','',sym)[:70]]+=1
        first=False
dur=p1-p0
print(f'window {dur*1000:.0f} ms; samples at 499 Hz (1 sample ~ 2.0 ms CPU); 2 cores = {2*dur*499:.0f} samples max')
for r,n in tot.most_common(): print(f'  {r:6} {n:5} samples = {n/499:.3f} CPU-s')
print('by thread:')
for (r,c),n in by.most_common(30): print(f'  {r:6} {c:22} {n:5}  {n/499*1000:.0f} ms')
for r in ['dst','src']:
    print(f'top leaf symbols {r}:')
    for s,n in syms[r].most_common(15): print(f'   {n:5} {s}')
