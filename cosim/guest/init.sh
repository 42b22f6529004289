#!/bin/sh
# /init of the offcard guest initramfs (busybox ash, PID 1). The contract with
# cosim/guest/qemu.py, all on the console (ttyS0), one line each:
#
#   OFFCARD-ERROR <text>                set-up failed (a module, eth0, the address); the
#                                       command loop still starts
#   OFFCARD-READY <if> <mac> <ip>       eth0 is up (operstate up) with its address, the
#                                       console is set up (echo off) and the command loop
#                                       reads from now on; "-" for what is absent
#
# then the command loop: it reads lines, ignores every line that does not start with
# "OFFCARD-CMD ", and for
#
#   OFFCARD-CMD <token> <base64 of the command> [<timeout s>]
#
# runs `sh -c <command>` (stdin /dev/null, stderr into stdout, killed after <timeout> seconds
# with exit status 137) and prints
#
#   OFFCARD-BEGIN <token>
#   <output, as it came>
#   OFFCARD-DONE <token> <exit status> <1 if the output ended in a newline or was empty, else
#                0 and a newline was added before this line>
#
# Kernel command line: offcard.ip=ADDR/PREFIX (eth0's address), offcard.gw=ADDR (default
# route), offcard.peer=ADDR (exported as OFFCARD_PEER to commands), offcard.printk=N (console
# loglevel once set up, default 1: kernel messages would cut into command output),
# offcard.ipv6=1 (keep IPv6 on eth0; off by default, so that the guest sends nothing on its own
# but ARP), offcard.shell=1 (an interactive shell on the console instead of the command loop).
#
# OFFCARD_INIT_SELFTEST=1 runs only the command loop on stdin/stdout, with OFFCARD_WORK as
# its scratch folder (the unit tests run it on the host).

PATH=/bin
HOME=/root
export PATH HOME

serve() {
    work=${OFFCARD_WORK:-/tmp}
    while IFS= read -r line; do
        case $line in
            "OFFCARD-CMD "*) ;;
            *) continue ;;
        esac
        set -- $line
        tok=$2
        secs=${4:-0}
        if ! printf '%s\n' "$3" | base64 -d >"$work/cmd" 2>/dev/null; then
            echo "OFFCARD-BEGIN $tok"
            echo "offcard-init: bad base64 in the command"
            echo "OFFCARD-DONE $tok 255 1"
            continue
        fi
        if [ "$secs" -gt 0 ] 2>/dev/null; then
            (cd /; timeout -s KILL "$secs" sh -c "$(cat "$work/cmd")") \
                </dev/null >"$work/out" 2>&1
        else
            (cd /; sh -c "$(cat "$work/cmd")") </dev/null >"$work/out" 2>&1
        fi
        rc=$?
        echo "OFFCARD-BEGIN $tok"
        cat "$work/out"
        last=$(tail -c 1 "$work/out" | od -An -tx1 | tr -d ' \n')
        if [ -n "$last" ] && [ "$last" != 0a ]; then
            echo
            nl=0
        else
            nl=1
        fi
        echo "OFFCARD-DONE $tok $rc $nl"
    done
}

if [ "$OFFCARD_INIT_SELFTEST" = 1 ]; then
    serve
    exit 0
fi

error() { echo "OFFCARD-ERROR $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
hostname offcard-guest

ip=
gw=
peer=
printk=1
ipv6=0
shell=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        offcard.ip=*) ip=${arg#offcard.ip=} ;;
        offcard.gw=*) gw=${arg#offcard.gw=} ;;
        offcard.peer=*) peer=${arg#offcard.peer=} ;;
        offcard.printk=*) printk=${arg#offcard.printk=} ;;
        offcard.ipv6=*) ipv6=${arg#offcard.ipv6=} ;;
        offcard.shell=*) shell=${arg#offcard.shell=} ;;
    esac
done
OFFCARD_PEER=$peer
export OFFCARD_PEER

echo "offcard-init: kernel $(uname -r), loading modules"
for mod in $(cat /etc/offcard/modules); do
    insmod "/lib/modules/$mod.ko" || error "insmod $mod failed"
done

ip link set lo up

ifname=-
mac=-
addr=-
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do
    usleep 100000
    n=$((n + 1))
done
if [ -e /sys/class/net/eth0 ]; then
    ifname=eth0
    mac=$(cat /sys/class/net/eth0/address)
    [ "$ipv6" = 1 ] || echo 1 >/proc/sys/net/ipv6/conf/eth0/disable_ipv6
    ip link set eth0 up || error "ip link set eth0 up failed"
    if [ -n "$ip" ]; then
        if ip addr add "$ip" dev eth0; then addr=$ip; else error "ip addr add $ip failed"; fi
    fi
    if [ -n "$gw" ]; then
        ip route add default via "$gw" || error "ip route add default via $gw failed"
    fi
    # operstate follows the carrier through linkwatch, up to a second later
    n=0
    while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $n -lt 100 ]; do
        usleep 100000
        n=$((n + 1))
    done
    state=$(cat /sys/class/net/eth0/operstate)
    [ "$state" = up ] || error "eth0 operstate is $state after 10 s (no carrier?)"
else
    [ -n "$ip" ] && error "no eth0 after 5 s (no virtio-net device, or virtio_net did not probe)"
fi

echo "$printk 4 1 7" >/proc/sys/kernel/printk

if [ "$shell" = 1 ]; then
    echo "OFFCARD-READY $ifname $mac $addr"
    echo "offcard-init: interactive shell; 'poweroff -f' powers off"
    while true; do
        setsid cttyhack sh -l
    done
fi

stty -echo -F /dev/console 2>/dev/null || stty -echo
echo "OFFCARD-READY $ifname $mac $addr"
serve </dev/console >/dev/console 2>&1
echo "offcard-init: the console closed; powering off"
poweroff -f
