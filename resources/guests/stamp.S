/*
 * stamp.S -- Ferry's "stamp" test guest.
 *
 * A tiny PVH-bootable guest that continuously rewrites a memory region with
 * per-(page, pass) stamps and verifies, before overwriting a page, that it
 * still holds exactly what the previous pass wrote.  Any page lost, stale or
 * partially copied by live migration is reported on COM1.
 *
 * Constraints (nested "PVM" KVM emulates every instruction): plain integer
 * instructions, port I/O and memory accesses only.  No SSE, no string ops,
 * no cmov, no int n.  IF stays 0 and there is no IDT unless `timer=1` or `dev=1`.
 *
 * Optional checks (command line, see README.md):
 *   timer=1       IDT + LAPIC timer in TSC-deadline mode, re-armed by its
 *                 interrupt handler; "stamp: ticks <n>" every TICKS_PER_LINE
 *                 ticks.  With region=0 the guest idles in hlt between ticks.
 *   zero-check=1  after each pass, sample every RAM page the guest never
 *                 writes; "stamp: NONZERO page=<pfn> found=<hex>" (then halt)
 *                 or "stamp: zero-check <n> ok".
 *   dev=1         drive the simulated DMA devices (dev.S): after each pass
 *                 check their DMA pages, SCRATCH registers and MSI-X;
 *                 "stamp: dev <pass> ok seq=<n>" (dma=<pages>, ecam=<hex>).
 *   high=1        the region starts at 4 GiB (RAM above the 32-bit gap)
 *                 instead of REGION_BASE; not with zero-check=1 or dev=1.
 *
 * See README.md next to this file for line formats and memory layout.
 *
 * Build variants (manual testing only):
 *   -DSELFTEST_CORRUPT=<page>        after pass 1, flip one bit of the stamp
 *   -DSELFTEST_CORRUPT_OFF=<offset>  at this byte offset (0, 2048 or 4088;
 *                                    default 4088) of that region page.
 *   -DSELFTEST_CORRUPT_PASS=<n>      corrupt after pass n instead of pass 1
 *                                    (0 = before pass 1: "fresh" page dirty).
 *   -DSELFTEST_DEV_ID=<id>           dev=1 looks for this (device << 16 |
 *                                    vendor) instead of 1b36:fe77, and
 *                                    does not wait for its interrupts.
 *   -DSELFTEST_TOUCH_TOP             after building the page tables, write
 *                                    and read back the last qword of the
 *                                    highest RAM range (checks the >4 GiB
 *                                    identity map; a bad map triple-faults).
 */

        .intel_syntax noprefix

        .set COM1,            0x3f8
        .set COM1_LSR,        0x3fd
        .set LSR_THRE,        0x20

        .set START_MAGIC,     0x336ec578
        .set SI_CMDLINE,      24
        .set SI_MEMMAP,       40
        .set SI_MEMMAP_N,     48
        .set MM_ADDR,         0
        .set MM_SIZE,         8
        .set MM_TYPE,         16
        .set MM_ENTRY_SIZE,   24
        .set E820_RAM,        1

        .set REGION_BASE,     0x1000000       /* 16 MiB */
        .set HIGH_REGION_BASE, 0x100000000    /* 4 GiB: high=1 */
        .set REGION_MAX_MIB,  65536           /* 64 GiB -> 2^24 pages */
        .set DEFAULT_REGION,  16
        .set MAX_PDS,         64              /* 64 x 1 GiB mapped at most */

        .set PTE_P_RW,        0x03
        .set PTE_P_RW_PS,     0x83

        .set SEL_CODE64,      0x08
        .set SEL_DATA,        0x10

        .set MSR_EFER,        0xc0000080
        .set EFER_LME,        0x100
        .set CR4_PAE,         0x20
        .set CR0_PE_PG,       0x80000001

        /* Stamp mixing constant (odd => multiplication is a bijection). */
        .set STAMP_K,         0x9e3779b97f4a7c15

        /* timer=1: LAPIC timer in TSC-deadline mode. */
        .set MSR_APIC_BASE,   0x1b
        .set APIC_BASE_EN,    0x800
        .set MSR_TSC_DEADLINE, 0x6e0
        .set APIC_TPR,        0x80
        .set APIC_EOI,        0xb0
        .set APIC_SVR,        0xf0
        .set APIC_LVT_TIMER,  0x320
        .set LVT_TSC_DEADLINE, 2 << 17
        .set TIMER_VEC,       0x40
        .set SPURIOUS_VEC,    0xff
        /* ~3.8 ms at 2.6 GHz: ~260 ticks/s, a ticks line about every second. */
        .set TICK_TSC,        10000000
        .set TICKS_PER_LINE,  256
        .set IDT_ENTRIES,     256

        /* zero-check=1: sampled qwords of each page (OR-ed together). */
        .set ZC_OFF1,         1032
        .set ZC_OFF2,         2056
        .set ZC_OFF3,         3080
        .set ZC_OFF4,         4088

        /* dev=1: simulated DMA devices (dev.S, README.md). */
#ifdef SELFTEST_DEV_ID
        .set DEV_ID,          SELFTEST_DEV_ID /* selftest.sh: a QEMU device */
#else
        .set DEV_ID,          0xfe771b36      /* device << 16 | vendor */
#endif
        .set DEV_MAX,         8
        .set DEV_VEC,         0x41            /* MSI-X vector of device n: 0x41 + n */
        .set DEV_BAR_BASE,    0xd0000000      /* BAR0 of device n: + n * 0x10000 */
        .set DEFAULT_ECAM,    0xe0000000
        .set DEFAULT_DMA,     256             /* pages per device */
        .set DMA_MAX_PAGES,   4096
        .set DESC_PAGES,      64              /* pages per descriptor */
        .set PCI_COMMAND,     0x04            /* dword: command | status << 16 */
        .set PCI_STATUS_CAP_LIST, 0x10
        .set PCI_CMD_MEM_BM,  0x6
        .set PCI_BAR0,        0x10
        .set PCI_CAP_PTR,     0x34
        .set PCI_CAP_MSIX,    0x11
        .set MSIX_ENABLE,     0x80000000      /* in the capability's first dword */
        .set MSIX_FMASK,      0x40000000
        .set MSI_ADDR,        0xfee00000
        .set DEV_CTRL,        0x04
        .set DEV_CTRL_RUN_IRQ, 0x3
        .set DEV_STATUS,      0x08
        .set DEV_STATUS_BUSY, 0x1
        .set DEV_STATUS_ERROR, 0x2
        .set DEV_RING_LO,     0x10
        .set DEV_RING_HI,     0x14
        .set DEV_RING_LEN,    0x18
        .set DEV_SEQ_LO,      0x20
        .set DEV_SEQ_HI,      0x24
        .set DEV_ERR_ADDR_LO, 0x30
        .set DEV_ERR_ADDR_HI, 0x34
        .set DEV_SCRATCH,     0x40
        .set DEV_SCRATCH_N,   16
        .set SCRATCH_K,       0x9e3779b1

#ifdef SELFTEST_CORRUPT
#ifndef SELFTEST_CORRUPT_OFF
#define SELFTEST_CORRUPT_OFF 4088
#endif
#ifndef SELFTEST_CORRUPT_PASS
#define SELFTEST_CORRUPT_PASS 1
#endif
#endif

/* ------------------------------------------------------------------------ */
/* PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18).           */
/* The descriptor is 8 bytes (like Linux on x86-64): QEMU reads a size_t for */
/* ELF64 images, linux-loader reads the low 32 bits.                         */
/* ------------------------------------------------------------------------ */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4               /* namesz */
        .long   8               /* descsz */
        .long   18              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .balign 4
        .quad   pvh_start
        .balign 4

/* ------------------------------------------------------------------------ */
/* 32-bit PVH entry: protected mode, paging off, ebx = hvm_start_info.       */
/* ------------------------------------------------------------------------ */
        .section .text.entry, "ax"
        .code32
        .globl  pvh_start
        .type   pvh_start, @function
pvh_start:
        cli
        cld
        mov     esp, offset stack_top
        mov     [start_info_ptr], ebx

        lgdt    [gdt_desc]
        mov     ax, SEL_DATA
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     fs, ax
        mov     gs, ax

        /* Zero PML4 and PDPT (two consecutive pages). */
        mov     edi, offset pml4
        mov     ecx, 2 * 4096 / 4
        xor     eax, eax
1:      mov     [edi], eax
        add     edi, 4
        dec     ecx
        jnz     1b

        /* Identity-map 0..4 GiB with 2 MiB pages (PDs 0..3). */
        mov     edi, offset pds
        xor     eax, eax                /* 2 MiB page index */
2:      mov     edx, eax
        shl     edx, 21
        or      edx, PTE_P_RW_PS
        mov     [edi], edx
        mov     edx, eax
        shr     edx, 11
        mov     [edi + 4], edx
        add     edi, 8
        inc     eax
        cmp     eax, 4 * 512
        jne     2b

        mov     edi, offset pdpt
        mov     eax, offset pds + PTE_P_RW
        mov     ecx, 4
3:      mov     [edi], eax
        mov     dword ptr [edi + 4], 0
        add     eax, 4096
        add     edi, 8
        dec     ecx
        jnz     3b

        mov     dword ptr [pml4], offset pdpt + PTE_P_RW

        /* Enter long mode. */
        mov     eax, offset pml4
        mov     cr3, eax
        mov     eax, cr4
        or      eax, CR4_PAE
        mov     cr4, eax
        mov     ecx, MSR_EFER
        rdmsr
        or      eax, EFER_LME
        wrmsr
        mov     eax, cr0
        or      eax, CR0_PE_PG
        mov     cr0, eax

        /* ljmp SEL_CODE64:long_entry (encoded by hand, ptr16:32). */
        .byte   0xea
        .long   long_entry
        .word   SEL_CODE64

/* ------------------------------------------------------------------------ */
/* 64-bit code                                                               */
/* ------------------------------------------------------------------------ */
        .code64
long_entry:
        mov     ax, SEL_DATA
        mov     ds, ax
        mov     es, ax
        mov     ss, ax
        mov     esp, offset stack_top   /* zero-extends into rsp */

        mov     ebx, [start_info_ptr]   /* rbx = &hvm_start_info */
        cmp     dword ptr [rbx], START_MAGIC
        jne     err_startinfo

        /* ---- memmap: total RAM (r8) and highest RAM end (r9) ---- */
        mov     rsi, [rbx + SI_MEMMAP]
        mov     ecx, [rbx + SI_MEMMAP_N]
        test    rsi, rsi
        jz      err_memmap
        test    ecx, ecx
        jz      err_memmap
        xor     r8d, r8d
        xor     r9d, r9d
4:      cmp     dword ptr [rsi + MM_TYPE], E820_RAM
        jne     5f
        mov     rax, [rsi + MM_ADDR]
        mov     rdx, [rsi + MM_SIZE]
        add     r8, rdx
        add     rax, rdx
        cmp     rax, r9
        jbe     5f
        mov     r9, rax
5:      add     rsi, MM_ENTRY_SIZE
        dec     ecx
        jnz     4b
        mov     [ram_total], r8

        /* ---- extend the identity map above 4 GiB if RAM goes there ---- */
        mov     rax, r9
        add     rax, (1 << 30) - 1
        shr     rax, 30                 /* number of 1 GiB PDs needed */
        cmp     rax, MAX_PDS
        jbe     6f
        mov     eax, MAX_PDS
6:      cmp     rax, 4
        jbe     8f
        /* PD entries 2048 .. rax*512-1 */
        mov     rcx, rax
        shl     rcx, 9                  /* end 2 MiB page index */
        mov     edx, 4 * 512            /* current 2 MiB page index */
        mov     edi, offset pds + 4 * 512 * 8
7:      mov     r10, rdx
        shl     r10, 21
        or      r10, PTE_P_RW_PS
        mov     [rdi], r10
        add     rdi, 8
        inc     rdx
        cmp     rdx, rcx
        jb      7b
        /* PDPT entries 4 .. rax-1 */
        mov     ecx, 4
        mov     edi, offset pdpt + 4 * 8
        mov     r10d, offset pds + 4 * 4096 + PTE_P_RW
71:     mov     [rdi], r10
        add     r10, 4096
        add     rdi, 8
        inc     ecx
        cmp     rcx, rax
        jb      71b
        mov     rax, cr3                /* flush */
        mov     cr3, rax
8:
#ifdef SELFTEST_TOUCH_TOP
        mov     rax, MAX_PDS << 30
        cmp     r9, rax
        ja      81f
        mov     rax, 0x5a5a5a5a5a5a5a5a
        mov     [r9 - 8], rax
        cmp     [r9 - 8], rax
        jne     halt_forever
        lea     rsi, [str_touch_top]
        call    puts
        mov     rax, r9
        sub     rax, 8
        call    print_hex
        call    newline
81:
#endif
        /* ---- command line: region=MiB passes=N timer=0|1 zero-check=0|1 ---- */
        mov     qword ptr [region_mib], DEFAULT_REGION
        mov     qword ptr [region_base], REGION_BASE
        mov     qword ptr [passes], 0
        mov     qword ptr [timer_on], 0
        mov     qword ptr [zero_check], 0
        mov     qword ptr [dev_on], 0
        mov     qword ptr [dma_pages], DEFAULT_DMA
        mov     eax, DEFAULT_ECAM
        mov     [ecam_base], rax
        mov     rsi, [rbx + SI_CMDLINE]
        test    rsi, rsi
        jz      cmdline_done
cmd_next:
        movzx   eax, byte ptr [rsi]
        test    al, al
        jz      cmdline_done
        cmp     al, ' '
        ja      cmd_token
        inc     rsi                     /* skip separators (space, tab, ...) */
        jmp     cmd_next
cmd_token:
        lea     rdi, [str_region_eq]
        call    match_prefix
        test    eax, eax
        jz      9f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     [region_mib], rax
        jmp     cmd_skip
9:      lea     rdi, [str_passes_eq]
        call    match_prefix
        test    eax, eax
        jz      91f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     [passes], rax
        jmp     cmd_skip
91:     lea     rdi, [str_timer_eq]
        call    match_prefix
        test    eax, eax
        jz      92f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     [timer_on], rax
        jmp     cmd_skip
92:     lea     rdi, [str_zero_check_eq]
        call    match_prefix
        test    eax, eax
        jz      93f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     [zero_check], rax
        jmp     cmd_skip
93:     lea     rdi, [str_dev_eq]
        call    match_prefix
        test    eax, eax
        jz      94f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     [dev_on], rax
        jmp     cmd_skip
94:     lea     rdi, [str_dma_eq]
        call    match_prefix
        test    eax, eax
        jz      95f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     [dma_pages], rax
        jmp     cmd_skip
95:     lea     rdi, [str_high_eq]
        call    match_prefix
        test    eax, eax
        jz      96f
        call    parse_dec
        test    rdx, rdx
        jz      cmd_skip
        mov     rdx, REGION_BASE        /* high=0: the default */
        test    rax, rax
        jz      97f
        mov     rdx, HIGH_REGION_BASE
97:     mov     [region_base], rdx
        jmp     cmd_skip
96:     lea     rdi, [str_ecam_eq]
        call    match_prefix
        test    eax, eax
        jz      cmd_skip
        call    parse_hex
        test    rdx, rdx
        jz      cmd_skip
        mov     [ecam_base], rax
cmd_skip:                               /* skip the rest of the token */
        movzx   eax, byte ptr [rsi]
        test    al, al
        jz      cmdline_done
        cmp     al, ' '
        jbe     cmd_next
        inc     rsi
        jmp     cmd_skip
cmdline_done:

        /* ---- boot line ---- */
        lea     rsi, [str_boot]
        call    puts
        mov     rax, [ram_total]
        add     rax, 0x80000            /* round to the nearest MiB: the */
        shr     rax, 20                 /* e820 holes below 1 MiB are tiny */
        call    print_dec
        lea     rsi, [str_region_out]
        call    puts
        mov     rax, [region_mib]
        call    print_dec
        call    newline

        /* ---- high=1 checks nothing but the region ---- */
        mov     rax, [region_base]
        cmp     rax, REGION_BASE
        je      23f
        mov     rax, [zero_check]
        or      rax, [dev_on]
        jnz     err_high
        lea     rsi, [str_region_at]
        call    puts
        mov     rax, [region_base]
        call    print_hex
        call    newline
23:
        /* ---- dev=1: find the devices (sizes the DMA areas) ---- */
        cmp     qword ptr [dev_on], 0
        je      20f
        call    dev_scan
20:
        /* ---- region fit: contiguous RAM from region_base ---- */
        mov     rax, [region_mib]
        cmp     rax, REGION_MAX_MIB
        ja      err_region
        shl     rax, 20
        add     rax, [region_base]      /* rax = region end */
        add     rax, [dma_total]        /* + DMA areas (dev=1) */
        mov     rdx, MAX_PDS << 30      /* the identity map's end */
        cmp     rax, rdx
        ja      err_region
        mov     r10, [region_base]      /* r10 = end of contiguous RAM */
10:     xor     r11d, r11d              /* extended in this round? */
        mov     rsi, [rbx + SI_MEMMAP]
        mov     ecx, [rbx + SI_MEMMAP_N]
11:     cmp     dword ptr [rsi + MM_TYPE], E820_RAM
        jne     12f
        mov     rdx, [rsi + MM_ADDR]
        cmp     rdx, r10
        ja      12f                     /* starts after r10 */
        add     rdx, [rsi + MM_SIZE]
        cmp     rdx, r10
        jbe     12f                     /* ends at/before r10 */
        mov     r10, rdx
        mov     r11d, 1
12:     add     rsi, MM_ENTRY_SIZE
        dec     ecx
        jnz     11b
        test    r11d, r11d
        jnz     10b
        cmp     rax, r10
        ja      err_region

        /* ---- optional checks ---- */
        cmp     qword ptr [timer_on], 0
        je      16f
        call    timer_setup
16:     cmp     qword ptr [dev_on], 0
        je      21f
        call    dev_setup
21:     cmp     qword ptr [zero_check], 0
        je      17f
        call    zero_sweep              /* before the first pass too */
17:
/* ------------------------------------------------------------------------ */
/* Workload                                                                  */
/*   v(i,p)  = (p << 24) | i        (i < 2^24 pages, p >= 1)                 */
/*   x       = v * STAMP_K  mod 2^64                                         */
/*   S(i,p)  = x ^ (x >> 29)                                                 */
/*   page words: [0] = S, [2048] = rol(S, 32), [4088] = S                    */
/* ------------------------------------------------------------------------ */
        mov     r12, [region_mib]
        shl     r12, 8                  /* r12 = pages in region */
        mov     r13, [passes]           /* r13 = passes (0 = forever) */
        mov     r14d, 1                 /* r14 = current pass p */
        mov     r15, STAMP_K            /* r15 = K */
        test    r12, r12
        jnz     pass_loop
        cmp     qword ptr [dev_on], 0
        jne     pass_loop               /* region=0 dev=1: empty passes */
        cmp     qword ptr [timer_on], 0
        jne     idle_loop               /* region=0 timer=1: tick only */

pass_loop:
#ifdef SELFTEST_CORRUPT
        /* Manual self-test: flip bit 0 of one stamp word just before pass
         * SELFTEST_CORRUPT_PASS + 1 starts (i.e. after that pass is done). */
        cmp     r14, SELFTEST_CORRUPT_PASS + 1
        jne     14f
        mov     rax, SELFTEST_CORRUPT
        cmp     rax, r12
        jae     14f
        shl     rax, 12
        add     rax, [region_base]
        add     rax, SELFTEST_CORRUPT_OFF
        xor     qword ptr [rax], 1
14:
#endif
        mov     r9, r14
        shl     r9, 24                  /* r9 = v base of pass p */
        mov     r8, r9
        sub     r8, 1 << 24             /* r8 = v base of pass p-1 */
        xor     ebp, ebp                /* rbp = mask: 0 in pass 1 ... */
        cmp     r14, 1
        je      13f
        not     rbp                     /* ... all ones afterwards */
13:     mov     rdi, [region_base]
        xor     ecx, ecx                /* rcx = page index i */
        test    r12, r12
        jz      pass_done

page_loop:
        /* expected = S(i, p-1), or 0 in pass 1 */
        lea     rax, [r8 + rcx]
        imul    rax, r15
        mov     rdx, rax
        shr     rdx, 29
        xor     rax, rdx
        and     rax, rbp
        mov     rdx, [rdi]
        cmp     rdx, rax
        jne     mismatch
        mov     rdx, [rdi + 4088]
        mov     rsi, rax
        rol     rax, 32
        cmp     [rdi + 2048], rax
        jne     mismatch_mid
        cmp     rdx, rsi
        jne     mismatch_end
        /* new = S(i, p) */
        lea     rax, [r9 + rcx]
        imul    rax, r15
        mov     rdx, rax
        shr     rdx, 29
        xor     rax, rdx
        mov     [rdi], rax
        mov     [rdi + 4088], rax
        rol     rax, 32
        mov     [rdi + 2048], rax
        add     rdi, 4096
        inc     rcx
        cmp     rcx, r12
        jb      page_loop

pass_done:
        lea     rsi, [str_pass]
        call    puts
        mov     rax, r14
        call    print_dec
        lea     rsi, [str_ok]
        call    puts
        cmp     qword ptr [zero_check], 0
        je      18f
        call    zero_sweep
18:     cmp     qword ptr [timer_on], 0
        je      19f
        call    tick_report
19:     cmp     qword ptr [dev_on], 0
        je      22f
        mov     rax, r14
        call    dev_check
22:     test    r13, r13
        jz      15f
        cmp     r14, r13
        jae     reset
15:     inc     r14
        jmp     pass_loop

/* Mismatch reporting: rcx = page, rax = expected, rdx/mem = found. */
mismatch_mid:
        mov     rdx, [rdi + 2048]
        jmp     mismatch
mismatch_end:
        mov     rax, rsi
mismatch:
        mov     r10, rax                /* expected */
        mov     r11, rdx                /* found */
        mov     rbx, rcx                /* page */
        lea     rsi, [str_mismatch]
        call    puts
        mov     rax, rbx
        call    print_dec
        lea     rsi, [str_expected]
        call    puts
        mov     rax, r10
        call    print_hex
        lea     rsi, [str_found]
        call    puts
        mov     rax, r11
        call    print_hex
        call    newline
        jmp     halt_forever

/* ------------------------------------------------------------------------ */
/* Errors / termination                                                      */
/* ------------------------------------------------------------------------ */
err_high:
        lea     rsi, [str_err_high]
        call    puts
        jmp     reset
err_region:
        lea     rsi, [str_err_region]
        call    puts
        jmp     reset
err_memmap:
        lea     rsi, [str_err_memmap]
        call    puts
        jmp     reset
err_startinfo:
        lea     rsi, [str_err_startinfo]
        call    puts
        jmp     reset

reset:
        mov     al, 0xfe
        out     0x64, al                /* i8042 pulse reset line */
halt_forever:
        cli
        hlt
        jmp     halt_forever

/* ------------------------------------------------------------------------ */
/* Helpers (clobber only what is stated)                                     */
/* ------------------------------------------------------------------------ */

#include "checks.S"
#include "dev.S"

#include "helpers.S"

/* ------------------------------------------------------------------------ */
/* Data                                                                      */
/* ------------------------------------------------------------------------ */
        .section .rodata
hex_digits:        .ascii "0123456789abcdef"
str_region_eq:     .asciz "region="
str_passes_eq:     .asciz "passes="
str_timer_eq:      .asciz "timer="
str_zero_check_eq: .asciz "zero-check="
str_dev_eq:        .asciz "dev="
str_dma_eq:        .asciz "dma="
str_high_eq:       .asciz "high="
str_region_at:     .asciz "stamp: region at "
str_err_high:      .asciz "stamp: ERROR high=1 with zero-check=1 or dev=1\n"
str_ecam_eq:       .asciz "ecam="
str_dev_found:     .asciz "stamp: dev found="
str_dev:           .asciz "stamp: dev "
str_dev_seq:       .asciz " ok seq="
str_dma_mismatch:  .asciz "stamp: DMA MISMATCH page="
str_reg_mismatch:  .asciz "stamp: REG MISMATCH dev="
str_reg:           .asciz " reg="
str_dev_error:     .asciz "stamp: DEV ERROR dev="
str_status:        .asciz " status="
str_addr:          .asciz " addr="
str_dev_short:     .asciz "stamp: dev WARNING ring too short dev="
str_dev_short2:    .asciz " wraps="
str_dev_short3:    .asciz " (a DMA page lost in a migration may be rewritten before it is checked: raise dma= or lower dma-rate)\n"
str_err_nodev:     .asciz "stamp: ERROR no device\n"
str_err_dma:       .asciz "stamp: ERROR dma out of range\n"
str_err_msix:      .asciz "stamp: ERROR no MSI-X table in BAR0 dev="
str_ticks:         .asciz "stamp: ticks "
str_zero_ok1:      .asciz "stamp: zero-check "
str_nonzero:       .asciz "stamp: NONZERO page="
str_err_vector:    .asciz "stamp: ERROR unexpected interrupt or exception\n"
str_boot:          .asciz "stamp: boot mem="
str_region_out:    .asciz " region="
str_pass:          .asciz "stamp: pass "
str_ok:            .asciz " ok\n"
str_mismatch:      .asciz "stamp: MISMATCH page="
str_expected:      .asciz " expected="
str_found:         .asciz " found="
str_err_region:    .asciz "stamp: ERROR region too large\n"
str_err_memmap:    .asciz "stamp: ERROR no memory map in start info\n"
str_err_startinfo: .asciz "stamp: ERROR bad hvm_start_info magic\n"
#ifdef SELFTEST_TOUCH_TOP
str_touch_top:     .asciz "stamp: selftest touched top of RAM at "
#endif

        .section .data
        .balign 16
gdt:
        .quad   0                       /* null */
        .quad   0x00af9b000000ffff      /* 0x08: 64-bit code, accessed */
        .quad   0x00cf93000000ffff      /* 0x10: flat data, accessed */
gdt_end:
        .balign 8
        .word   0                       /* pad so the base is 8-aligned */
        .word   0
        .word   0
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt

        .balign 8
start_info_ptr:    .quad 0
ram_total:         .quad 0
region_mib:        .quad 0
region_base:       .quad 0                 /* REGION_BASE, or 4 GiB (high=1) */
passes:            .quad 0
timer_on:          .quad 0
zero_check:        .quad 0
lapic_base:        .quad 0
ticks:             .quad 0
next_report:       .quad TICKS_PER_LINE
zero_sweeps:       .quad 0
dev_on:            .quad 0
dma_pages:         .quad 0
ecam_base:         .quad 0
ndevs:             .quad 0
dma_total:         .quad 0                 /* bytes of DMA areas (dev=1) */
dev_pass:          .quad 0
dev_cfg:           .skip DEV_MAX * 8        /* ECAM config base per device */
dev_area:          .skip DEV_MAX * 8        /* ring page per device */
dev_irqs:          .skip DEV_MAX * 8        /* MSI-X interrupts per device */
dev_irq_seen:      .skip DEV_MAX * 8        /* dev_irqs at the last (re)start */
dev_short_warned:  .quad 0
idt_desc_pad:      .word 0, 0, 0
idt_desc:
        .word   IDT_ENTRIES * 16 - 1
        .quad   idt

/* ------------------------------------------------------------------------ */
/* BSS: page tables and stack (page aligned; see stamp.ld)                  */
/* ------------------------------------------------------------------------ */
        .section .bss
        .balign 4096
pml4:   .skip   4096
pdpt:   .skip   4096                    /* must follow pml4 (zeroed together) */
pds:    .skip   MAX_PDS * 4096          /* 64 PDs: identity map up to 64 GiB */
idt:    .skip   IDT_ENTRIES * 16            /* timer=1 only */
stack:  .skip   16384
stack_top:
