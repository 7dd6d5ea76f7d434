/* vdev.elf: drives the engine's virtio-pci devices from CPL3 (native speed
 * on this host's KVM). The kernel command line picks the test:
 *   blk        read the disk's pattern, write one back, get-id, flush
 *   blkro      a write to a read-only disk must fail with IOERR
 *   blkerr     read until the host's file fails under it (host I/O error)
 *   blkbench   read the whole disk sequentially (64 x 256 KiB in flight)
 *   rng        ask for 64 random bytes
 *   rngintx    the same with INTx (IOAPIC) instead of MSI-X
 *   con        write to virtio-console, echo one input line back
 *   net        DHCP, ARP with the gateway, then a TCP echo server on port 22
 *   nettap     the TCP echo server only (tap: the host's stack talks to it)
 *   netbench   DHCP, then 64 MiB of UDP to 10.0.2.2:5555
 *   hostile    break the queue protocol in every way listed in the tests
 *   hostcon    virtio-console: the aliasing transmit chain (20 x 200 MiB of
 *              the same RAM) that once made the host copy 4 GiB
 *   hostblk    virtio-blk: an aliasing 200 MiB read, GET_ID without a
 *              buffer, an indirect descriptor (never offered)
 * Results go to COM1 as text lines the host-side tests match exactly. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define NULL ((void *)0)
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("lock; addl $0,(%%rsp)" ::: "memory")

void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static int memcmp_(const void *a, const void *b, unsigned long n)
{
    const u8 *p = a, *q = b;
    for (unsigned long i = 0; i < n; i++)
        if (p[i] != q[i])
            return p[i] - q[i];
    return 0;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc(char c)
{
    while (!(inb(0x3fd) & 0x20))
        ;
    outb(0x3f8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v, int digits)
{
    for (int i = digits - 1; i >= 0; i--)
        putc("0123456789abcdef"[(v >> (4 * i)) & 0xf]);
}
static void putdec(u64 v)
{
    char b[24];
    int n = 0;
    do {
        b[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n)
        putc(b[--n]);
}
static void poweroff(void)
{
    outw(0x404, 0x3400);
    for (;;)
        ;
}
static void fail(const char *why)
{
    puts("FAIL ");
    puts(why);
    puts("\n");
    poweroff();
}
static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* ---------------- CPL0 set-up (interpreted: keep it short) ---------------- */
extern u64 gdt[];
extern u8 idt[];
extern u8 kstack_top[];
extern void exc_common(void), irq_intx(void);
extern void irq_0(void), irq_1(void), irq_2(void), irq_3(void);
extern void irq_4(void), irq_5(void), irq_6(void), irq_7(void);
extern volatile u32 irq_count[8];
extern volatile u32 intx_count;

static u64 pml4[512] __attribute__((aligned(4096)));
static u64 pdpt[512] __attribute__((aligned(4096)));
static u64 pd[4][512] __attribute__((aligned(4096)));
/* TSS with a full I/O permission bitmap (all ports allowed): this host's
   KVM checks the bitmap for CPL3 port I/O even with IOPL 3. */
static u8 tss[104 + 8192 + 1] __attribute__((aligned(16)));
static char cmdline[64];

/* Exception frame words (error code or RIP first): report and halt. */
void exc_report(const u64 *f)
{
    puts("exception");
    for (int i = 0; i < 4; i++) {
        putc(' ');
        puthex(f[i], 16);
    }
    puts("\n");
}

static void set_gate(int v, void (*h)(void))
{
    u64 a = (u64)h;
    u8 *g = idt + 16 * v;
    *(u16 *)g = (u16)a;
    *(u16 *)(g + 2) = 0x08;
    g[4] = 0;
    g[5] = 0x8e;
    *(u16 *)(g + 6) = (u16)(a >> 16);
    *(u32 *)(g + 8) = (u32)(a >> 32);
    *(u32 *)(g + 12) = 0;
}

void kinit(const u8 *bp)
{
    const char *c = (const char *)(u64) * (const u32 *)(bp + 0x228);
    for (int i = 0; i < 63 && c[i]; i++)
        cmdline[i] = c[i];
    /* Identity map 4 GiB with 2 MiB user pages; 3..4 GiB (MMIO) uncached. */
    pml4[0] = (u64)pdpt | 7;
    for (int i = 0; i < 4; i++) {
        pdpt[i] = (u64)pd[i] | 7;
        u64 flags = i == 3 ? 0x9f : 0x87;
        for (int j = 0; j < 512; j++)
            pd[i][j] = ((u64)i << 30) + ((u64)j << 21) + flags;
    }
    __asm__ volatile("mov %0, %%cr3" : : "r"((u64)pml4) : "memory");
    u64 sp = (u64)kstack_top;
    *(u64 *)(tss + 4) = sp;
    *(u16 *)(tss + 102) = 104;
    tss[104 + 8192] = 0xff;
    u64 b = (u64)tss, lim = sizeof tss - 1;
    gdt[5] = (lim & 0xffff) | ((lim >> 16) << 48) | ((b & 0xffffff) << 16) | (0x89UL << 40) | (((b >> 24) & 0xff) << 56);
    gdt[6] = b >> 32;
    for (int v = 0; v < 32; v++)
        set_gate(v, exc_common);
    void (*irqs[8])(void) = {irq_0, irq_1, irq_2, irq_3, irq_4, irq_5, irq_6, irq_7};
    for (int v = 0; v < 8; v++)
        set_gate(0x40 + v, irqs[v]);
    set_gate(0x50, irq_intx);
    *(volatile u32 *)0xfee000f0 = 0x1ff; /* local APIC on, spurious 0xff */
    outb(0x21, 0xff); /* 8259s masked: only MSI-X and IOAPIC interrupts */
    outb(0xa1, 0xff);
}

/* ---------------- PCI ---------------- */
static u32 cfg_addr(int slot, int off) { return 0x80000000u | (slot << 11) | (off & 0xfc); }
static u32 cfg32(int slot, int off) { outl(0xcf8, cfg_addr(slot, off)); return inl(0xcfc); }
static void cfgw32(int slot, int off, u32 v) { outl(0xcf8, cfg_addr(slot, off)); outl(0xcfc, v); }
static u8 cfg8(int slot, int off) { return (u8)(cfg32(slot, off) >> (8 * (off & 3))); }

static int find_dev(u16 devid)
{
    for (int s = 0; s < 32; s++)
        if (cfg32(s, 0) == ((u32)devid << 16 | 0x1af4))
            return s;
    return -1;
}

/* ---------------- virtio ---------------- */
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct vq {
    u16 size, last_used, avail_idx;
    volatile struct desc *desc;
    volatile u16 *avail; /* flags, idx, ring[] */
    volatile u8 *used;   /* flags, idx, {id,len}[] */
    volatile u16 *notify;
};
struct vdev {
    int slot;
    volatile u8 *bar, *common, *isr, *devcfg, *notify_base, *msix;
    u32 notify_mult;
    int msix_cap, nq;
    u64 features;
    struct vq q[2];
};

/* The ISR the INTx handler reads; 0 = none. */
volatile u8 *volatile intx_isr;
static int use_msix = 1;

static u64 heap = 0x1000000; /* 16 MiB up: rings and buffers */
static void *alloc(u64 n, u64 align)
{
    heap = (heap + align - 1) & ~(align - 1);
    void *p = (void *)heap;
    heap += n;
    memset(p, 0, n);
    return p;
}

#define C8(d, o) (*(volatile u8 *)((d)->common + (o)))
#define C16(d, o) (*(volatile u16 *)((d)->common + (o)))
#define C32(d, o) (*(volatile u32 *)((d)->common + (o)))
#define C64(d, o) (*(volatile u64 *)((d)->common + (o)))

static u8 status(struct vdev *d) { return C8(d, 0x14); }

static u64 bar_base(int slot) { return 0xd0000000ul + ((u64)slot << 16); }

/* Size BAR 0, place it, enable decoding; find the capabilities. */
static int vdev_probe(struct vdev *d, int slot)
{
    d->slot = slot;
    cfgw32(slot, 0x10, 0xffffffff);
    u32 sz = ~(cfg32(slot, 0x10) & ~0xfu) + 1;
    if (sz != 0x4000) {
        puts("bar size ");
        puthex(sz, 8);
        puts("\n");
        return -1;
    }
    cfgw32(slot, 0x10, (u32)bar_base(slot));
    cfgw32(slot, 4, cfg32(slot, 4) | 6); /* memory + bus master */
    d->bar = (volatile u8 *)bar_base(slot);
    int p = cfg8(slot, 0x34), n = 0;
    while (p && n++ < 48) {
        u8 id = cfg8(slot, p);
        if (id == 0x09) {
            u8 type = cfg8(slot, p + 3);
            u32 off = cfg32(slot, p + 8);
            volatile u8 *a = d->bar + off;
            if (type == 1) d->common = a;
            if (type == 2) { d->notify_base = a; d->notify_mult = cfg32(slot, p + 16); }
            if (type == 3) d->isr = a;
            if (type == 4) d->devcfg = a;
        } else if (id == 0x11) {
            d->msix_cap = p;
            d->msix = d->bar + (cfg32(slot, p + 4) & ~7u);
        }
        p = cfg8(slot, p + 1);
    }
    return d->common && d->notify_base && d->isr ? 0 : -1;
}

static void vdev_reset(struct vdev *d)
{
    C8(d, 0x14) = 0;
    while (status(d))
        ;
}

static void msix_setup(struct vdev *d, int vectors)
{
    for (int v = 0; v < vectors; v++) {
        volatile u32 *e = (volatile u32 *)(d->msix + 16 * v);
        e[0] = 0xfee00000;
        e[1] = 0;
        e[2] = 0x40 + v;
        e[3] = 0;
    }
    u32 ctl = cfg32(d->slot, d->msix_cap);
    cfgw32(d->slot, d->msix_cap, ctl | 0x80000000u);
}

static int vq_setup(struct vdev *d, int i, u16 size)
{
    struct vq *q = &d->q[i];
    C16(d, 0x16) = i;
    u16 max = C16(d, 0x18);
    if (size > max)
        size = max;
    C16(d, 0x18) = size;
    q->size = size;
    q->desc = alloc(16 * size, 4096);
    q->avail = alloc(6 + 2 * size, 4096);
    q->used = alloc(6 + 8 * size, 4096);
    q->last_used = q->avail_idx = 0;
    C64(d, 0x20) = (u64)q->desc;
    C64(d, 0x28) = (u64)q->avail;
    C64(d, 0x30) = (u64)q->used;
    C16(d, 0x1a) = i; /* MSI-X vector i */
    q->notify = (volatile u16 *)(d->notify_base + C16(d, 0x1e) * d->notify_mult);
    C16(d, 0x1c) = 1;
    return 0;
}

/* Negotiate (VERSION_1 plus `want`), set up `nq` queues, DRIVER_OK. */
static int vdev_init(struct vdev *d, u64 want, int nq, u16 qsize)
{
    vdev_reset(d);
    C8(d, 0x14) = 1;
    C8(d, 0x14) = 1 | 2;
    C32(d, 0x00) = 0;
    u64 f = C32(d, 0x04);
    C32(d, 0x00) = 1;
    f |= (u64)C32(d, 0x04) << 32;
    d->features = f;
    if (!(f & (1ul << 32)))
        return -1;
    u64 use = f & (want | (1ul << 32));
    C32(d, 0x08) = 0;
    C32(d, 0x0c) = (u32)use;
    C32(d, 0x08) = 1;
    C32(d, 0x0c) = (u32)(use >> 32);
    C8(d, 0x14) = 1 | 2 | 8;
    if (!(status(d) & 8))
        return -2;
    if (use_msix)
        msix_setup(d, nq + 1);
    C16(d, 0x10) = nq; /* config vector */
    d->nq = nq;
    for (int i = 0; i < nq; i++)
        vq_setup(d, i, qsize);
    C8(d, 0x14) = 1 | 2 | 8 | 4;
    return status(d) & 0x40 ? -3 : 0;
}

static void vq_push(struct vq *q, u16 head)
{
    q->avail[2 + q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    mb();
    q->avail[1] = q->avail_idx;
    mb();
}
/* Notify unless the device said it is busy anyway (VRING_USED_F_NO_NOTIFY). */
static void vq_kick(struct vq *q, int i)
{
    if (!(*(volatile u16 *)q->used & 1))
        *q->notify = i;
}
static int vq_used(struct vq *q, u32 *id, u32 *len)
{
    volatile u16 *uidx = (volatile u16 *)(q->used + 2);
    if (*uidx == q->last_used)
        return 0;
    barrier();
    volatile u32 *e = (volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->size));
    *id = e[0];
    *len = e[1];
    q->last_used++;
    return 1;
}
/* Spin (interrupts on) until one used element appears. */
static int vq_wait(struct vq *q, u32 *id, u32 *len)
{
    for (u64 spins = 0; spins < 4000000000ul; spins++)
        if (vq_used(q, id, len))
            return 1;
    return 0;
}

/* ---------------- virtio-blk ---------------- */
struct blkreq { u32 type, rsv; u64 sector; };

static int blk_rw(struct vdev *d, u32 type, u64 sector, void *buf, u32 len)
{
    struct vq *q = &d->q[0];
    static struct blkreq *hdr;
    static u8 *st;
    if (!hdr) {
        hdr = alloc(sizeof *hdr, 16);
        st = alloc(1, 16);
    }
    hdr->type = type;
    hdr->rsv = 0;
    hdr->sector = sector;
    *st = 0xff;
    q->desc[0] = (struct desc){(u64)hdr, 16, 1, 1};
    if (len) {
        int out = type == 1 || type == 11; /* device reads the buffer */
        q->desc[1] = (struct desc){(u64)buf, len, (u16)(1 | (out ? 0 : 2)), 2};
        q->desc[2] = (struct desc){(u64)st, 1, 2, 0};
    } else {
        q->desc[1] = (struct desc){(u64)st, 1, 2, 0};
    }
    vq_push(q, 0);
    vq_kick(q, 0);
    u32 id, ul;
    if (!vq_wait(q, &id, &ul))
        return -1;
    return *st;
}

static void test_blk(int ro)
{
    int s = find_dev(0x1042);
    struct vdev d = {0};
    if (s < 0 || vdev_probe(&d, s))
        fail("no virtio-blk");
    if (vdev_init(&d, (1 << 5) | (1 << 9) | (1 << 2) | (1 << 6) | (1 << 13), 1, 128))
        fail("blk init");
    u64 cap = *(volatile u64 *)d.devcfg;
    puts("blk capacity ");
    putdec(cap);
    puts(d.features & (1 << 5) ? " ro\n" : " rw\n");
    u8 *buf = alloc(65536, 4096);
    if (ro) {
        memset(buf, 0x5a, 512);
        puts("blk write status ");
        putdec(blk_rw(&d, 1, 0, buf, 512));
        puts("\n");
        poweroff();
    }
    /* The host filled byte i of the image with (i * 7 + i / 4096) & 0xff. */
    u32 bad = 0;
    for (u64 off = 0; off < 1 << 20; off += 65536) {
        if (blk_rw(&d, 0, off / 512, buf, 65536))
            fail("blk read status");
        for (u32 i = 0; i < 65536; i++) {
            u64 x = off + i;
            if (buf[i] != (u8)(x * 7 + x / 4096))
                bad++;
        }
    }
    puts("blk read 1048576 bytes, ");
    putdec(bad);
    puts(" bad\n");
    for (u32 i = 0; i < 4096; i++)
        buf[i] = (u8)(0xa5 ^ i);
    puts("blk write status ");
    putdec(blk_rw(&d, 1, 2048, buf, 4096));
    puts("\n");
    memset(buf, 0, 64);
    puts("blk id status ");
    putdec(blk_rw(&d, 8, 0, buf, 20));
    puts(" '");
    for (int i = 0; i < 5; i++)
        putc(buf[i]);
    puts("'\nblk flush status ");
    putdec(blk_rw(&d, 4, 0, NULL, 0));
    puts("\nblk discard status ");
    {
        u64 *seg = (u64 *)buf; /* {sector, sectors | flags << 32} */
        seg[0] = 1024;
        seg[1] = 8;
        putdec(d.features & (1 << 13) ? blk_rw(&d, 11, 0, buf, 16) : 99);
        memset(buf, 0xee, 4096);
        int st = blk_rw(&d, 0, 1024, buf, 4096);
        u32 nz = 0;
        for (int i = 0; i < 4096; i++)
            nz += buf[i] != 0;
        puts(st == 0 && nz == 0 ? ", reads zeros" : ", data left");
    }
    puts("\nblk past end status ");
    putdec(blk_rw(&d, 0, cap, buf, 512));
    puts("\nmsix ");
    puts(irq_count[0] > 0 ? "delivered" : "missing");
    puts("\n");
    poweroff();
}

/* Read sector 0 until the host makes it fail (it truncates the image). */
static void test_blkerr(void)
{
    int s = find_dev(0x1042);
    struct vdev d = {0};
    if (s < 0 || vdev_probe(&d, s))
        fail("no virtio-blk");
    if (vdev_init(&d, 0, 1, 16))
        fail("blk init");
    u8 *buf = alloc(4096, 4096);
    int st = 0;
    for (u64 n = 0; n < 100000000ul && !st; n++)
        st = blk_rw(&d, 0, 0, buf, 4096);
    puts("blk read status ");
    putdec(st);
    puts("\n");
    poweroff();
}

/* Sequential read of the whole disk, 64 requests of 256 KiB in flight. */
static void test_blkbench(void)
{
    int s = find_dev(0x1042);
    struct vdev d = {0};
    if (s < 0 || vdev_probe(&d, s))
        fail("no virtio-blk");
    if (vdev_init(&d, 1 << 2, 1, 256))
        fail("blk init");
    u64 cap = *(volatile u64 *)d.devcfg * 512;
    enum { DEPTH = 64, CHUNK = 256 << 10 };
    struct vq *q = &d.q[0];
    struct blkreq *hdr = alloc(16 * DEPTH, 16);
    u8 *st = alloc(DEPTH, 16);
    u8 *data = alloc((u64)DEPTH * CHUNK, 4096);
    u64 next = 0, done = 0;
    int inflight = 0;
    q->avail[0] = 1; /* VRING_AVAIL_F_NO_INTERRUPT: this loop polls */
    puts("bench start\n");
    outb(0x440, 1);
    for (;;) {
        int kicked = 0;
        while (inflight < DEPTH && next < cap) {
            int slot = -1;
            /* The free slot: chains 0..DEPTH-1 are reused in used order, so
               the slot of request k is k % DEPTH. */
            slot = (int)((next / CHUNK) % DEPTH);
            u32 len = cap - next < CHUNK ? (u32)(cap - next) : CHUNK;
            hdr[slot] = (struct blkreq){0, 0, next / 512};
            volatile struct desc *dd = &q->desc[3 * slot];
            dd[0] = (struct desc){(u64)&hdr[slot], 16, 1, (u16)(3 * slot + 1)};
            dd[1] = (struct desc){(u64)data + (u64)slot * CHUNK, len, 3, (u16)(3 * slot + 2)};
            dd[2] = (struct desc){(u64)&st[slot], 1, 2, 0};
            vq_push(q, 3 * slot);
            next += len;
            inflight++;
            kicked = 1;
        }
        if (kicked)
            vq_kick(q, 0);
        if (!inflight)
            break;
        u32 id, len;
        while (vq_used(q, &id, &len)) {
            if (st[id / 3])
                fail("bench read status");
            done += len - 1;
            inflight--;
        }
    }
    puts("bench done ");
    putdec(done);
    puts("\n");
    poweroff();
}

/* ---------------- virtio-rnd ---------------- */
static void test_rng(void)
{
    int s = find_dev(0x1044);
    struct vdev d = {0};
    if (s < 0 || vdev_probe(&d, s))
        fail("no virtio-rnd");
    if (vdev_init(&d, 0, 1, 16))
        fail("rng init");
    u8 *buf = alloc(64, 64);
    struct vq *q = &d.q[0];
    q->desc[0] = (struct desc){(u64)buf, 64, 2, 0};
    vq_push(q, 0);
    vq_kick(q, 0);
    u32 id, len;
    if (!vq_wait(q, &id, &len))
        fail("rng timeout");
    int nz = 0;
    for (int i = 0; i < 64; i++)
        nz += buf[i] != 0;
    puts("rng ");
    putdec(len);
    puts(" bytes, ");
    puts(nz > 32 ? "random" : "zeros");
    puts(irq_count[0] > 0 ? ", msix delivered\n" : ", msix missing\n");
    poweroff();
}

/* virtio-rnd with INTx: MSI-X left off, pin A routed through the IOAPIC. */
static void test_rngintx(void)
{
    int s = find_dev(0x1044);
    struct vdev d = {0};
    if (s < 0 || vdev_probe(&d, s))
        fail("no virtio-rnd");
    u8 line = cfg8(s, 0x3c), pin = cfg8(s, 0x3d);
    volatile u32 *ioapic = (volatile u32 *)0xfec00000ul;
    ioapic[0] = 0x10 + 2 * line + 1;
    ioapic[4] = 0;                  /* destination: APIC 0 */
    ioapic[0] = 0x10 + 2 * line;
    ioapic[4] = 0x50 | (1u << 15);  /* vector 0x50, level, active high */
    intx_isr = d.isr;
    use_msix = 0;
    if (vdev_init(&d, 0, 1, 16))
        fail("rng init");
    u8 *buf = alloc(32, 64);
    struct vq *q = &d.q[0];
    q->desc[0] = (struct desc){(u64)buf, 32, 2, 0};
    vq_push(q, 0);
    vq_kick(q, 0);
    u32 id, len;
    if (!vq_wait(q, &id, &len))
        fail("rng timeout");
    for (u64 i = 0; i < 100000000ul && !intx_count; i++)
        barrier();
    puts("intx pin ");
    putdec(pin);
    puts(line >= 16 && line < 24 ? " line ok, rng " : " line bad, rng ");
    putdec(len);
    puts(intx_count ? " bytes, intx delivered" : " bytes, intx missing");
    puts(irq_count[0] ? ", msix fired\n" : "\n");
    poweroff();
}

/* ---------------- virtio-console ---------------- */
static void test_con(void)
{
    int s = find_dev(0x1043);
    struct vdev d = {0};
    if (s < 0 || vdev_probe(&d, s))
        fail("no virtio-console");
    if (vdev_init(&d, 0, 2, 16))
        fail("console init");
    u8 *in = alloc(256, 64), *out = alloc(512, 64);
    struct vq *rx = &d.q[0], *tx = &d.q[1];
    rx->desc[0] = (struct desc){(u64)in, 256, 2, 0};
    vq_push(rx, 0);
    vq_kick(rx, 0);
    const char *hello = "hello from virtio-console\n";
    int n = 0;
    while (hello[n])
        out[n] = hello[n], n++;
    tx->desc[0] = (struct desc){(u64)out, n, 0, 0};
    vq_push(tx, 0);
    vq_kick(tx, 1);
    u32 id, len;
    if (!vq_wait(tx, &id, &len))
        fail("console tx");
    /* Collect input up to a newline, then echo it back. */
    int got = 0;
    u8 line[256];
    while (got < 200) {
        if (!vq_wait(rx, &id, &len))
            fail("console rx");
        for (u32 i = 0; i < len && got < 255; i++)
            line[got++] = in[i];
        if (got && line[got - 1] == '\n')
            break;
        vq_push(rx, 0);
        vq_kick(rx, 0);
    }
    const char *pre = "echo: ";
    n = 0;
    while (pre[n])
        out[n] = pre[n], n++;
    for (int i = 0; i < got; i++)
        out[n++] = line[i];
    tx->desc[0] = (struct desc){(u64)out, n, 0, 0};
    vq_push(tx, 0);
    vq_kick(tx, 1);
    if (!vq_wait(tx, &id, &len))
        fail("console tx 2");
    puts("console done\n");
    poweroff();
}

/* ---------------- virtio-net ---------------- */
enum { RXBUF = 12 + 65550, NRX = 16, TXBUF = 12 + 65550, NTX = 32 };
static struct vdev net;
static u8 *rxbufs, *txbufs;
static u8 mymac[6], gwmac[6];
static const u8 myip[4] = {10, 0, 2, 15}, gwip[4] = {10, 0, 2, 2};
static int tx_free = NTX;
static u16 tx_next;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void wbe16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = (u8)v; }
static void wbe32(u8 *p, u32 v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = (u8)v; }

static u32 csum_add(u32 s, const u8 *p, u32 n)
{
    for (u32 i = 0; i + 1 < n; i += 2)
        s += (u32)p[i] << 8 | p[i + 1];
    if (n & 1)
        s += (u32)p[n - 1] << 8;
    return s;
}
static u16 csum_fold(u32 s)
{
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

static void rx_post(int i)
{
    struct vq *q = &net.q[0];
    q->desc[i] = (struct desc){(u64)rxbufs + (u64)i * RXBUF, RXBUF, 2, 0};
    vq_push(q, i);
}

static void tx_reclaim(void)
{
    u32 id, len;
    while (vq_used(&net.q[1], &id, &len))
        tx_free++;
}

static void net_poll(void);

/* A frame buffer (after the 12-byte header) to fill and send. */
static u8 *tx_get(void)
{
    if (!tx_free)
        vq_kick(&net.q[1], 1); /* batched sends: make sure the device saw them */
    while (!tx_free)
        net_poll(); /* receive too: passt may wait for us to read */
    u8 *b = txbufs + (u64)(tx_next % NTX) * TXBUF;
    memset(b, 0, 12);
    return b + 12;
}
static void tx_send(u32 len, int kick)
{
    struct vq *q = &net.q[1];
    int i = tx_next % NTX;
    q->desc[i] = (struct desc){(u64)txbufs + (u64)i * TXBUF, 12 + len, 0, 0};
    tx_next++;
    tx_free--;
    vq_push(q, i);
    if (kick)
        vq_kick(q, 1);
}

static void eth_hdr(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, mymac, 6);
    wbe16(f + 12, type);
}
static void ip_hdr(u8 *ip, const u8 *src, const u8 *dst, u8 proto, u16 payload)
{
    memset(ip, 0, 20);
    ip[0] = 0x45;
    wbe16(ip + 2, 20 + payload);
    ip[6] = 0x40; /* DF */
    ip[8] = 64;
    ip[9] = proto;
    memcpy(ip + 12, src, 4);
    memcpy(ip + 16, dst, 4);
    wbe16(ip + 10, csum_fold(csum_add(0, ip, 20)));
}

static void send_dhcp_discover(void)
{
    static const u8 bcast[6] = {255, 255, 255, 255, 255, 255};
    static const u8 zero[4] = {0}, all[4] = {255, 255, 255, 255};
    u8 *f = tx_get();
    eth_hdr(f, bcast, 0x0800);
    u8 *udp = f + 34, *b = udp + 8;
    memset(b, 0, 300);
    b[0] = 1; b[1] = 1; b[2] = 6;
    wbe32(b + 4, 0x12345678);
    memcpy(b + 28, mymac, 6);
    wbe32(b + 236, 0x63825363);
    u8 *o = b + 240;
    *o++ = 53; *o++ = 1; *o++ = 1;       /* DHCPDISCOVER */
    *o++ = 55; *o++ = 2; *o++ = 1; *o++ = 3;
    *o++ = 255;
    wbe16(udp, 68);
    wbe16(udp + 2, 67);
    wbe16(udp + 4, 8 + 300);
    wbe16(udp + 6, 0);
    ip_hdr(f + 14, zero, all, 17, 308);
    tx_send(14 + 20 + 308, 1);
}

static void send_arp(u16 op, const u8 *tmac, const u8 *tip)
{
    static const u8 bcast[6] = {255, 255, 255, 255, 255, 255};
    u8 *f = tx_get();
    eth_hdr(f, op == 1 ? bcast : tmac, 0x0806);
    u8 *a = f + 14;
    wbe16(a, 1); wbe16(a + 2, 0x0800); a[4] = 6; a[5] = 4; wbe16(a + 6, op);
    memcpy(a + 8, mymac, 6);
    memcpy(a + 14, myip, 4);
    memcpy(a + 18, op == 1 ? (const u8[6]){0} : tmac, 6);
    memcpy(a + 24, tip, 4);
    tx_send(42, 1);
}

/* TCP echo server state (one connection). */
static u8 peer_mac[6], peer_ip[4];
static u16 peer_port, my_port = 22;
static u32 snd_nxt, rcv_nxt;
static int tcp_state; /* 0 listen, 1 established, 2 closed */

static void send_tcp(u8 flags, const u8 *data, u32 len)
{
    u8 *f = tx_get();
    eth_hdr(f, peer_mac, 0x0800);
    u8 *t = f + 34;
    memset(t, 0, 20);
    wbe16(t, my_port);
    wbe16(t + 2, peer_port);
    wbe32(t + 4, snd_nxt);
    wbe32(t + 8, rcv_nxt);
    t[12] = 5 << 4;
    t[13] = flags;
    wbe16(t + 14, 65535);
    memcpy(t + 20, data, len);
    u8 ph[12];
    memcpy(ph, myip, 4);
    memcpy(ph + 4, peer_ip, 4);
    ph[8] = 0; ph[9] = 6;
    wbe16(ph + 10, 20 + len);
    wbe16(t + 16, csum_fold(csum_add(csum_add(0, ph, 12), t, 20 + len)));
    ip_hdr(f + 14, myip, peer_ip, 6, 20 + len);
    tx_send(34 + 20 + len, 1);
}

static int dhcp_done, arp_done;

static void handle_frame(u8 *f, u32 len)
{
    if (len < 14)
        return;
    u16 type = be16(f + 12);
    if (type == 0x0806 && len >= 42) {
        u8 *a = f + 14;
        if (be16(a + 6) == 1 && !memcmp_(a + 24, myip, 4))
            send_arp(2, a + 8, a + 14);
        if (be16(a + 6) == 2 && !memcmp_(a + 14, gwip, 4) && !arp_done) {
            arp_done = 1;
            puts("arp gateway is-at ");
            for (int i = 0; i < 6; i++) {
                puthex(a[8 + i], 2);
                if (i < 5)
                    putc(':');
            }
            puts("\n");
        }
        return;
    }
    if (type != 0x0800 || len < 34)
        return;
    u8 *ip = f + 14;
    u32 ihl = (ip[0] & 15) * 4;
    u32 tot = be16(ip + 2);
    if (tot > len - 14 || ihl < 20 || tot < ihl)
        return;
    u8 *l4 = ip + ihl;
    u32 l4len = tot - ihl;
    if (ip[9] == 17 && l4len >= 8 + 240 && be16(l4) == 67 && !dhcp_done) {
        u8 *b = l4 + 8;
        if (b[0] == 2 && be32(b + 4) == 0x12345678) {
            dhcp_done = 1;
            memcpy(gwmac, f + 6, 6);
            puts("dhcp offer ");
            for (int i = 0; i < 4; i++) {
                putdec(b[16 + i]);
                putc(i < 3 ? '.' : '\n');
            }
        }
        return;
    }
    if (ip[9] != 6 || l4len < 20)
        return;
    u8 *t = l4;
    u8 flags = t[13];
    u32 doff = (t[12] >> 4) * 4;
    if (be16(t + 2) != my_port || doff < 20 || doff > l4len)
        return;
    u32 dlen = l4len - doff;
    if (flags & 0x02) { /* SYN */
        memcpy(peer_mac, f + 6, 6);
        memcpy(peer_ip, ip + 12, 4);
        peer_port = be16(t);
        rcv_nxt = be32(t + 4) + 1;
        snd_nxt = 0x1000;
        send_tcp(0x12, NULL, 0);
        snd_nxt++;
        tcp_state = 1;
        puts("tcp syn\n");
        return;
    }
    if (tcp_state != 1 || be16(t) != peer_port)
        return;
    if (dlen && be32(t + 4) == rcv_nxt) {
        rcv_nxt += dlen;
        u8 reply[200];
        const char *pre = "pong: ";
        u32 n = 0;
        while (pre[n])
            reply[n] = pre[n], n++;
        for (u32 i = 0; i < dlen && n < sizeof reply; i++)
            reply[n++] = t[doff + i];
        send_tcp(0x18, reply, n);
        snd_nxt += n;
    }
    if (flags & 0x01) { /* FIN */
        rcv_nxt++;
        send_tcp(0x11, NULL, 0);
        snd_nxt++;
        tcp_state = 2;
        puts("tcp closed\n");
    }
}

static void net_poll(void)
{
    u32 id, len;
    int posted = 0;
    while (vq_used(&net.q[0], &id, &len)) {
        if (id < NRX && len > 12 && len <= RXBUF)
            handle_frame(rxbufs + (u64)id * RXBUF + 12, len - 12);
        rx_post(id % NRX);
        posted = 1;
    }
    if (posted)
        vq_kick(&net.q[0], 0);
    tx_reclaim();
}

static void net_up(int dhcp)
{
    int s = find_dev(0x1041);
    if (s < 0 || vdev_probe(&net, s))
        fail("no virtio-net");
    if (vdev_init(&net, (1 << 5) | (1 << 3) | (1ul << 16), 2, 256))
        fail("net init");
    for (int i = 0; i < 6; i++)
        mymac[i] = net.devcfg[i];
    puts("net mtu ");
    putdec(net.features & (1 << 3) ? *(volatile u16 *)(net.devcfg + 10) : 0);
    puts("\n");
    rxbufs = alloc((u64)NRX * RXBUF, 4096);
    txbufs = alloc((u64)NTX * TXBUF, 4096);
    for (int i = 0; i < NRX; i++)
        rx_post(i);
    vq_kick(&net.q[0], 0);
    if (!dhcp)
        return;
    send_dhcp_discover();
    for (u64 n = 0; !dhcp_done; n++) {
        net_poll();
        if (n == 2000000000ul)
            fail("no dhcp offer");
    }
}

/* slirp: DHCP and ARP with the gateway first; tap: straight to TCP. */
static void test_net(int slirp)
{
    net_up(slirp);
    if (slirp)
        send_arp(1, NULL, gwip);
    for (u64 n = 0; slirp && !arp_done; n++) {
        net_poll();
        if (n == 2000000000ul)
            fail("no arp reply");
    }
    puts("tcp listening\n");
    while (tcp_state != 2)
        net_poll();
    for (int i = 0; i < 1000000; i++)
        net_poll();
    puts(irq_count[0] + irq_count[1] > 0 ? "msix delivered\n" : "msix missing\n");
    poweroff();
}

/* 64 MiB of UDP datagrams to the gateway (host loopback through passt). */
static void test_netbench(void)
{
    net_up(1);
    enum { PAY = 16000, COUNT = 4194 }; /* 64 MiB; frames below 32 KiB (see net.rs) */
    puts("bench start\n");
    for (int k = 0; k < COUNT; k++) {
        u8 *f = tx_get();
        eth_hdr(f, gwmac, 0x0800);
        u8 *udp = f + 34;
        wbe16(udp, 40000); /* not 5555: passt binds the source port on the host */
        wbe16(udp + 2, 5555);
        wbe16(udp + 4, 8 + PAY);
        wbe16(udp + 6, 0);
        wbe32(udp + 8, k);
        ip_hdr(f + 14, myip, gwip, 17, 8 + PAY);
        tx_send(34 + 8 + PAY, (k & 7) == 7);
        net_poll();
    }
    vq_kick(&net.q[1], 1);
    while (tx_free < NTX)
        tx_reclaim();
    puts("bench done\n");
    poweroff();
}

/* ---------------- hostile ---------------- */
static struct vdev h;

static void expect_broken(const char *what)
{
    for (u64 i = 0; i < 200000000ul; i++)
        if (status(&h) & 0x40) {
            puts(what);
            puts(": needs reset\n");
            return;
        }
    puts(what);
    puts(": NOT refused\n");
}

static int rng_ok(void)
{
    if (vdev_init(&h, 0, 1, 16))
        return 0;
    struct vq *q = &h.q[0];
    u8 *buf = alloc(16, 16);
    q->desc[0] = (struct desc){(u64)buf, 16, 2, 0};
    vq_push(q, 0);
    vq_kick(q, 0);
    u32 id, len;
    return vq_wait(q, &id, &len) && len == 16;
}

static void hostile_chain(const char *what, struct desc d0, struct desc d1, u16 head, int jump)
{
    if (vdev_init(&h, 0, 1, 16))
        fail("hostile init");
    struct vq *q = &h.q[0];
    q->desc[0] = d0;
    q->desc[1] = d1;
    if (jump) {
        q->avail[1] = (u16)(q->avail_idx + jump);
        vq_kick(q, 0);
    } else {
        vq_push(q, head);
        vq_kick(q, 0);
    }
    expect_broken(what);
}

static void test_hostile(void)
{
    int s = find_dev(0x1044);
    if (s < 0 || vdev_probe(&h, s))
        fail("no virtio-rnd");
    u8 *buf = alloc(4096, 4096);
    hostile_chain("buffer outside RAM", (struct desc){0x7fff00000000ul, 64, 2, 0}, (struct desc){0}, 0, 0);
    hostile_chain("oversized length", (struct desc){(u64)buf, 0xffffffffu, 2, 0}, (struct desc){0}, 0, 0);
    hostile_chain("chain loop", (struct desc){(u64)buf, 8, 3, 1}, (struct desc){(u64)buf, 8, 3, 0}, 0, 0);
    hostile_chain("next index past table", (struct desc){(u64)buf, 8, 3, 999}, (struct desc){0}, 0, 0);
    hostile_chain("head index past table", (struct desc){0}, (struct desc){0}, 4000, 0);
    /* INDIRECT (4) was never offered; buf holds a table of empty descriptors. */
    hostile_chain("indirect descriptor", (struct desc){(u64)buf, 64, 4, 0}, (struct desc){0}, 0, 0);
    hostile_chain("avail index jump", (struct desc){0}, (struct desc){0}, 0, 1000);
    /* Bad queue size: not a power of two. */
    vdev_reset(&h);
    C8(&h, 0x14) = 1 | 2;
    C32(&h, 0x08) = 1;
    C32(&h, 0x0c) = 1;
    C8(&h, 0x14) = 1 | 2 | 8;
    C16(&h, 0x16) = 0;
    C16(&h, 0x18) = 3;
    C64(&h, 0x20) = (u64)buf;
    C64(&h, 0x28) = (u64)buf + 1024;
    C64(&h, 0x30) = (u64)buf + 2048;
    C16(&h, 0x1c) = 1;
    C8(&h, 0x14) = 1 | 2 | 8 | 4;
    expect_broken("queue size 3");
    /* Rings outside RAM. */
    vdev_reset(&h);
    C8(&h, 0x14) = 1 | 2;
    C32(&h, 0x08) = 1;
    C32(&h, 0x0c) = 1;
    C8(&h, 0x14) = 1 | 2 | 8;
    C16(&h, 0x16) = 0;
    C16(&h, 0x18) = 16;
    C64(&h, 0x20) = 0xf0000000ul;
    C64(&h, 0x28) = 0xfffffffffffff000ul;
    C64(&h, 0x30) = (u64)buf;
    C16(&h, 0x1c) = 1;
    C8(&h, 0x14) = 1 | 2 | 8 | 4;
    expect_broken("rings outside RAM");
    /* Features without VERSION_1 are refused (FEATURES_OK stays clear). */
    vdev_reset(&h);
    C8(&h, 0x14) = 1 | 2;
    C32(&h, 0x08) = 0;
    C32(&h, 0x0c) = 0xffffffff;
    C8(&h, 0x14) = 1 | 2 | 8;
    puts(status(&h) & 8 ? "bad features accepted\n" : "bad features refused\n");
    /* Odd accesses: out-of-range queue select, weird sizes, notify of a
       queue that does not exist, MSI-X table junk. */
    vdev_reset(&h);
    C16(&h, 0x16) = 77;
    C16(&h, 0x18) = 8;
    C64(&h, 0x20) = 0x1234;
    (void)C16(&h, 0x18);
    *(volatile u8 *)(h.common + 0x21) = 0xff;
    *(volatile u64 *)(h.common + 0x10) = ~0ul;
    *(volatile u16 *)(h.notify_base + 40) = 9;
    *(volatile u16 *)(h.msix + 3) = 0xffff;
    *(volatile u64 *)(h.msix + 0x3f8) = ~0ul;
    (void)*(volatile u64 *)(h.bar + 0x3ffc);
    /* BAR to silly places: over RAM, over the local APIC, all ones, zero. */
    u32 silly[] = {0x00100000, 0xfee00000, 0xffffffff, 0};
    for (int i = 0; i < 4; i++) {
        cfgw32(s, 0x10, silly[i]);
        (void)*(volatile u32 *)(u64)(silly[i] & ~0xfu);
    }
    cfgw32(s, 0x10, (u32)bar_base(s));
    /* After a reset the device works again. */
    puts(rng_ok() ? "device works after reset\n" : "device dead after reset\n");
    puts("hostile done\n");
    poweroff();
}

/* Console transmit chain of 20 descriptors of 200 MiB, all at the same
   guest address (RAM must be 256 MiB or more). The host must refuse it
   before copying anything; after a reset the port works again. */
static void test_hostcon(void)
{
    int s = find_dev(0x1043);
    if (s < 0 || vdev_probe(&h, s))
        fail("no virtio-console");
    if (vdev_init(&h, 0, 2, 32))
        fail("console init");
    struct vq *tx = &h.q[1];
    for (int i = 0; i < 20; i++)
        tx->desc[i] = (struct desc){0x2000000ul, 200u << 20, (u16)(i < 19), (u16)(i + 1)};
    vq_push(tx, 0);
    vq_kick(tx, 1);
    expect_broken("console aliasing chain");
    if (vdev_init(&h, 0, 2, 32))
        fail("console re-init");
    tx = &h.q[1];
    u8 *out = alloc(64, 64);
    memcpy(out, "after reset\n", 12);
    tx->desc[0] = (struct desc){(u64)out, 12, 0, 0};
    vq_push(tx, 0);
    vq_kick(tx, 1);
    u32 id, len;
    puts(vq_wait(tx, &id, &len) ? "console works after reset\n" : "console dead after reset\n");
    puts("hostcon done\n");
    poweroff();
}

static void test_hostblk(void)
{
    int s = find_dev(0x1042);
    if (s < 0 || vdev_probe(&h, s))
        fail("no virtio-blk");
    if (vdev_init(&h, 0, 1, 256))
        fail("blk init");
    struct vq *q = &h.q[0];
    struct blkreq *hdr = alloc(16, 16);
    u8 *st = alloc(16, 16);
    u8 *buf = alloc(1 << 20, 4096);
    u32 id, len;
    /* 200 descriptors aliasing one MiB: a 200 MiB read into 1 MiB. */
    *hdr = (struct blkreq){0, 0, 0};
    *st = 0xff;
    q->desc[0] = (struct desc){(u64)hdr, 16, 1, 1};
    for (int i = 1; i <= 200; i++)
        q->desc[i] = (struct desc){(u64)buf, 1 << 20, 3, (u16)(i + 1)};
    q->desc[201] = (struct desc){(u64)st, 1, 2, 0};
    vq_push(q, 0);
    vq_kick(q, 0);
    if (!vq_wait(q, &id, &len))
        fail("blk aliasing read");
    puts("blk aliasing read status ");
    putdec(*st);
    puts(" len ");
    putdec(len);
    /* GET_ID with nowhere to put the id but the status byte. */
    *hdr = (struct blkreq){8, 0, 0};
    *st = 0xff;
    q->desc[0] = (struct desc){(u64)hdr, 16, 1, 1};
    q->desc[1] = (struct desc){(u64)st, 1, 2, 0};
    vq_push(q, 0);
    vq_kick(q, 0);
    if (!vq_wait(q, &id, &len))
        fail("blk get-id");
    puts("\nblk id without buffer status ");
    putdec(*st);
    puts(" len ");
    putdec(len);
    puts("\n");
    /* The same request through an indirect table. */
    struct desc *table = alloc(32, 16);
    table[0] = (struct desc){(u64)hdr, 16, 1, 1};
    table[1] = (struct desc){(u64)st, 1, 2, 0};
    q->desc[0] = (struct desc){(u64)table, 32, 4, 0};
    vq_push(q, 0);
    vq_kick(q, 0);
    expect_broken("blk indirect descriptor");
    if (vdev_init(&h, 0, 1, 16))
        fail("blk re-init");
    puts(blk_rw(&h, 0, 0, buf, 512) == 0 ? "blk works after reset\n" : "blk dead after reset\n");
    puts("hostblk done\n");
    poweroff();
}

void umain(void)
{
    puts("vdev ");
    puts(cmdline);
    puts("\n");
    if (streq(cmdline, "blk"))
        test_blk(0);
    else if (streq(cmdline, "blkro"))
        test_blk(1);
    else if (streq(cmdline, "blkerr"))
        test_blkerr();
    else if (streq(cmdline, "blkbench"))
        test_blkbench();
    else if (streq(cmdline, "rng"))
        test_rng();
    else if (streq(cmdline, "rngintx"))
        test_rngintx();
    else if (streq(cmdline, "con"))
        test_con();
    else if (streq(cmdline, "net"))
        test_net(1);
    else if (streq(cmdline, "nettap"))
        test_net(0);
    else if (streq(cmdline, "netbench"))
        test_netbench();
    else if (streq(cmdline, "hostile"))
        test_hostile();
    else if (streq(cmdline, "hostcon"))
        test_hostcon();
    else if (streq(cmdline, "hostblk"))
        test_hostblk();
    fail("unknown test");
}

