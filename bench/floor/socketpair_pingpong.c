/*
 * The floor for a cross-process round trip on this machine: two processes,
 * a Unix socketpair, blocking read/write, no event loop. procluster's and
 * Node's round trips are compared against it in BENCHMARKS.md.
 *
 *   cc -O2 -o /tmp/pingpong bench/floor/socketpair_pingpong.c && /tmp/pingpong
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <time.h>
#include <sys/socket.h>
static int cmp(const void*a,const void*b){long x=*(long*)a,y=*(long*)b;return x<y?-1:x>y;}
int main(){int sv[2];socketpair(AF_UNIX,SOCK_STREAM,0,sv);char buf[64];int N=20000;
if(fork()==0){close(sv[0]);for(;;){ssize_t n=read(sv[1],buf,64);if(n<=0)_exit(0);write(sv[1],buf,n);}}
close(sv[1]);long*s=malloc(sizeof(long)*N);struct timespec a,b;
for(int i=0;i<N+1000;i++){clock_gettime(CLOCK_MONOTONIC,&a);write(sv[0],buf,16);read(sv[0],buf,64);clock_gettime(CLOCK_MONOTONIC,&b);if(i>=1000)s[i-1000]=(b.tv_sec-a.tv_sec)*1000000000L+(b.tv_nsec-a.tv_nsec);}
qsort(s,N,sizeof(long),cmp);printf("C blocking socketpair ping-pong: p50 %.1f us p99 %.1f us\n",s[N/2]/1000.0,s[N*99/100]/1000.0);return 0;}
