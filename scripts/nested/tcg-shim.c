/*
 * Preloaded into the L1 machine's QEMU (scripts/nested-test).
 *
 * QEMU 7.2's TCG asserts that the iothread lock is held in
 * tcg_handle_interrupt(), but its nested-SVM code calls cpu_interrupt()
 * without it when an L2 guest writes CR8 while L1's hypervisor has a
 * virtual-interrupt window open. UEFI firmware (EDK2) restores CR8 at the
 * end of every interrupt, so an OVMF guest in L2 hits the assertion within
 * a minute and takes the whole L1 machine down. The interrupt is raised by
 * the vCPU on its own state, which later QEMU releases do without the lock.
 *
 * This replaces glib's assertion reporter: that one assertion is let
 * through (once reported); every other assertion stays fatal.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*reporter)(const char *, const char *, int, const char *, const char *);

void g_assertion_message_expr(const char *domain, const char *file, int line,
                              const char *func, const char *expr)
{
    static int reported;
    reporter real;

    if (file && strstr(file, "accel/tcg/tcg-accel-ops.c") && expr &&
        strcmp(expr, "qemu_mutex_iothread_locked()") == 0) {
        if (!reported++)
            fprintf(stderr, "tcg-shim: let through %s:%d: %s\n", file, line, expr);
        return;
    }
    real = (reporter)dlsym(RTLD_NEXT, "g_assertion_message_expr");
    if (real)
        real(domain, file, line, func, expr);
    abort();
}
