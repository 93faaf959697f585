#!/usr/bin/env python3
# Junk on hato's UDP port (docs/benchmarks.md): STUN Binding requests whose
# USERNAME names no peer, to 127.0.0.1:PORT for SECS seconds, as fast as
# one process can or at RATE a second (BURST=n datagrams between pauses,
# default 512). Prints how many were sent. KIND=dtls sends DTLS-looking
# records instead, which no kernel filter can judge.
#
#   BURST=8 python3 tests/attack/junk.py 5000 10 160000
import socket, os, struct, sys, time
port=int(sys.argv[1]); secs=float(sys.argv[2]); rate=float(sys.argv[3]) if len(sys.argv)>3 else 0
s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1",port))
pkts=[]
for i in range(4096):
    user=os.urandom(8).hex().encode()+b":x"
    pad=(4-len(user)%4)%4
    attr=struct.pack("!HH",0x0006,len(user))+user+b"\0"*pad
    msg=struct.pack("!HHI",0x0001,len(attr),0x2112A442)+os.urandom(12)+attr
    if os.environ.get("KIND")=="dtls":
        msg=bytes([23,254,253])+os.urandom(len(msg)-3)
    pkts.append(msg)
BURST=int(os.environ.get("BURST","512"))
n=0; end=time.time()+secs
while time.time()<end:
    for p in pkts[:BURST]:
        try: s.send(p)
        except BlockingIOError: pass
    n+=BURST
    if rate:
        ahead = n/rate - (time.time()-(end-secs))
        if ahead > 0: time.sleep(ahead)
    pkts.append(pkts.pop(0))
print(n)
