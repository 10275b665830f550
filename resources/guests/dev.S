/*
 * dev.S -- the stamp guest's `dev=1` mode (included by stamp.S, in its
 * .text, 64-bit code; uses stamp.S's constants, variables and helpers).
 *
 * Drives up to DEV_MAX simulated DMA devices (1b36:fe77, `--sim-vfio`):
 *   dev_scan   ECAM scan of bus 0, "stamp: dev found=<n>", DMA area sizes
 *   dev_setup  IDT vectors 0x41.., BAR0, command, MSI-X entry 0, ring,
 *              SCRATCH, CTRL := RUN | IRQ
 *   dev_check  after every pass, per device: wait for an MSI-X interrupt
 *              since its last restart, stop, check every DMA page and
 *              SCRATCH, restart;
 *              "stamp: dev <pass> ok seq=<sum of SEQ>"
 *
 * Config space: aligned dword reads; dword writes for BARs, word writes for
 * the command register and the MSI-X message control (as Linux does).
 * See README.md next to this file.
 */

/* dev_scan: validates dma=, scans ECAM bus 0 (dev 1..31, fn 0) for
 * DEV_ID, records up to DEV_MAX config bases in dev_cfg, prints
 * "stamp: dev found=<n>" and sets dma_total = n * (dma + 1) pages.
 * No device -> "stamp: ERROR no device" and reset.
 * Clobbers rax, rcx, rdx, rsi, rdi. */
dev_scan:
        mov     rax, [dma_pages]
        test    rax, rax
        jz      err_dma
        cmp     rax, DMA_MAX_PAGES
        ja      err_dma
        mov     rsi, [ecam_base]
        mov     ecx, 1                          /* device number */
        xor     edx, edx                        /* devices found */
1:      mov     rax, rcx
        shl     rax, 15
        add     rax, rsi                        /* config base of 00:cc.0 */
        cmp     dword ptr [rax], DEV_ID
        jne     2f
        mov     [dev_cfg + rdx * 8], rax
        inc     edx
        cmp     edx, DEV_MAX
        je      3f
2:      inc     ecx
        cmp     ecx, 32
        jb      1b
3:      mov     [ndevs], rdx
        test    edx, edx
        jz      err_nodev
        mov     rax, [dma_pages]
        inc     rax                             /* + the ring page */
        imul    rax, rdx
        shl     rax, 12
        mov     [dma_total], rax
        lea     rsi, [str_dev_found]
        call    puts
        mov     rax, [ndevs]
        call    print_dec
        call    newline
        ret

err_nodev:
        lea     rsi, [str_err_nodev]
        call    puts
        jmp     reset
err_dma:
        lea     rsi, [str_err_dma]
        call    puts
        jmp     reset

/* dev_setup: interrupts (IDT as for timer=1 unless already set up, vectors
 * DEV_VEC + n), then per device n: BAR0, command, MSI-X entry 0 + enable,
 * ring, SCRATCH, CTRL := RUN | IRQ.  Ends with IF = 1.
 * Clobbers rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11. */
dev_setup:
        push    rbx
        push    rbp
        push    r12
        push    r13
        mov     al, 0xff                        /* mask both 8259s: firmware */
        out     0x21, al                        /* (SeaBIOS under QEMU) may */
        out     0xa1, al                        /* have left the PIT running */
        cmp     qword ptr [timer_on], 0
        jne     1f
        call    idt_setup                       /* timer=1 did it already */
1:      xor     ecx, ecx                        /* gates DEV_VEC .. +DEV_MAX-1 */
2:      lea     rax, [dev_isr_stubs]
        mov     edx, ecx
        shl     edx, 4                          /* stubs are 16 bytes apart */
        add     rax, rdx
        mov     edi, ecx
        add     edi, DEV_VEC
        shl     edi, 4
        add     rdi, offset idt
        mov     [rdi], ax                       /* offset 15:0 */
        shr     rax, 16
        mov     [rdi + 6], ax                   /* offset 31:16 */
        shr     rax, 16
        mov     [rdi + 8], eax                  /* offset 63:32 */
        inc     ecx
        cmp     ecx, DEV_MAX
        jb      2b

        mov     rsi, [region_mib]
        shl     rsi, 20
        add     rsi, REGION_BASE                /* rsi = DMA area of device 0 */
        xor     r12d, r12d                      /* r12 = n */
dev_setup_one:
        mov     rbx, [dev_cfg + r12 * 8]        /* rbx = config base */
        mov     r13d, r12d
        shl     r13d, 16
        add     r13d, DEV_BAR_BASE              /* r13 = BAR0 (zero-extended) */
        mov     [dev_area + r12 * 8], rsi
        /* BAR0 (decoding off meanwhile); a 64-bit BAR gets BAR1 = 0 */
        mov     word ptr [rbx + PCI_COMMAND], 0
        mov     eax, [rbx + PCI_BAR0]
        mov     [rbx + PCI_BAR0], r13d
        and     eax, 6
        cmp     eax, 4
        jne     3f
        mov     dword ptr [rbx + PCI_BAR0 + 4], 0
3:      mov     word ptr [rbx + PCI_COMMAND], PCI_CMD_MEM_BM
        /* MSI-X capability: walk the list from the pointer at 0x34 */
        mov     eax, [rbx + PCI_COMMAND]
        test    eax, PCI_STATUS_CAP_LIST << 16
        jz      err_msix
        mov     eax, [rbx + PCI_CAP_PTR]
        and     eax, 0xfc
        mov     ecx, 48                         /* bound: at most 48 caps */
4:      test    eax, eax
        jz      err_msix
        mov     edx, [rbx + rax]                /* id | next << 8 | ctl << 16 */
        cmp     dl, PCI_CAP_MSIX
        je      5f
        movzx   eax, dh
        and     eax, 0xfc
        dec     ecx
        jnz     4b
        jmp     err_msix
5:      lea     rbp, [rbx + rax]                /* rbp = MSI-X capability */
        mov     eax, [rbp + 4]                  /* table offset | BIR */
        test    eax, 7
        jnz     err_msix                        /* table not in BAR0 */
        and     eax, -8
        lea     rdi, [r13 + rax]                /* rdi = MSI-X table entry 0 */
        mov     dword ptr [rdi], MSI_ADDR       /* address lo (APIC ID 0) */
        mov     dword ptr [rdi + 4], 0          /* address hi */
        mov     eax, r12d
        add     eax, DEV_VEC
        mov     [rdi + 8], eax                  /* data: vector, fixed, edge */
        mov     dword ptr [rdi + 12], 0         /* vector control: unmasked */
        mov     eax, [rbp]                      /* message control: bits 31:16 */
        shr     eax, 16
        or      eax, MSIX_ENABLE >> 16
        and     eax, ~(MSIX_FMASK >> 16)
        mov     [rbp + 2], ax                   /* word write, as Linux does */
        /* ring page at rsi, buffers from rsi + 4096: DESC_PAGES each */
        lea     r8, [rsi + 4096]                /* r8 = buffer address */
        mov     r9, [dma_pages]                 /* r9 = pages left */
        mov     rdi, rsi                        /* rdi = descriptor */
        xor     r10d, r10d                      /* r10 = descriptors */
6:      mov     eax, DESC_PAGES
        cmp     r9, rax
        jae     7f
        mov     eax, r9d
7:      sub     r9, rax
        shl     eax, 12
        mov     [rdi], r8                       /* addr */
        mov     [rdi + 8], eax                  /* len */
        mov     dword ptr [rdi + 12], 0         /* flags */
        add     r8, rax
        add     rdi, 16
        inc     r10d
        test    r9, r9
        jnz     6b
        mov     [r13 + DEV_RING_LO], esi
        mov     rax, rsi
        shr     rax, 32
        mov     [r13 + DEV_RING_HI], eax
        mov     [r13 + DEV_RING_LEN], r10d
        /* SCRATCH[i] := scratch_value(n, i) */
        xor     ecx, ecx
8:      call    scratch_value
        mov     [r13 + DEV_SCRATCH + rcx * 4], eax
        inc     ecx
        cmp     ecx, DEV_SCRATCH_N
        jb      8b
        mov     dword ptr [r13 + DEV_CTRL], DEV_CTRL_RUN_IRQ
        mov     rsi, r8                         /* next device's area */
        inc     r12
        cmp     r12, [ndevs]
        jb      dev_setup_one
        sti
        pop     r13
        pop     r12
        pop     rbp
        pop     rbx
        ret

err_msix:
        lea     rsi, [str_err_msix]
        call    puts
        mov     rax, r12
        call    print_dec
        call    newline
        jmp     reset

/* scratch_value: eax = (SCRATCH_K * (16 * r12 + rcx + 1)) mod 2^32 -- never 0
 * (SCRATCH_K is odd and 16n + i + 1 <= 128).  Clobbers rax. */
scratch_value:
        mov     rax, r12
        shl     eax, 4
        add     eax, ecx
        inc     eax
        imul    eax, eax, SCRATCH_K
        ret

/* dev_check: rax = pass number.  For each device: wait for an interrupt
 * of it since its last (re)start, CTRL := 0, wait until not BUSY
 * (STATUS.ERROR -> DEV ERROR line, halt), read SEQ, check every DMA page
 * and SCRATCH (mismatch -> line, halt), CTRL := RUN | IRQ.  Then
 * "stamp: dev <pass> ok seq=<sum>".
 * Clobbers rax, rcx, rdx, rsi, rdi, r8, r9, r10, r11. */
dev_check:
        push    rbx
        push    rbp
        push    r12
        push    r13
        push    r14
        push    r15
        mov     [dev_pass], rax
        xor     r15d, r15d                      /* r15 = sum of SEQ */
        xor     r14d, r14d                      /* r14 = n */
dev_check_one:
        mov     r13d, r14d
        shl     r13d, 16
        add     r13d, DEV_BAR_BASE              /* r13 = BAR0 (zero-extended) */
        /* Liveness first: wait for an interrupt of this device since its
         * last (re)start -- its next ring wrap.  Checking right at the wrap
         * means that, after a migration, the engine has only written from
         * where it resumed up to the ring's end: the pages it wrote just
         * before the switch-over (behind that point) are still as the
         * destination received them, so a lost one cannot be overwritten
         * with the right value before it is checked. */
        mov     rbp, [dev_irq_seen + r14 * 8]
#ifdef SELFTEST_DEV_ID
        jmp     4f                              /* QEMU stand-in: no MSI-X */
#endif
3:      cli
        cmp     [dev_irqs + r14 * 8], rbp
        jne     4f
        sti
        hlt                                     /* sti shadow: no lost wake-up */
        mov     eax, [r13 + DEV_STATUS]         /* woken (e.g. timer=1): an */
        test    eax, DEV_STATUS_ERROR           /* engine error means no */
        jnz     dev_error                       /* interrupt will come */
        jmp     3b
4:      sti
        /* More than one wrap since the restart: the ring is shorter than a
         * pass, so after a migration the engine may rewrite every lost page
         * before it is checked.  Say so once. */
        mov     rax, [dev_irqs + r14 * 8]
        sub     rax, rbp
        cmp     rax, 1
        jbe     5f
        cmp     qword ptr [dev_short_warned], 0
        jne     5f
        mov     qword ptr [dev_short_warned], 1
        mov     rbx, rax
        lea     rsi, [str_dev_short]
        call    puts
        mov     rax, r14
        call    print_dec
        lea     rsi, [str_dev_short2]
        call    puts
        mov     rax, rbx
        call    print_dec
        lea     rsi, [str_dev_short3]
        call    puts
5:      mov     dword ptr [r13 + DEV_CTRL], 0
1:      mov     eax, [r13 + DEV_STATUS]
        test    eax, DEV_STATUS_BUSY
        jnz     1b
        test    eax, DEV_STATUS_ERROR
        jnz     dev_error
        mov     eax, [r13 + DEV_SEQ_LO]
        mov     edx, [r13 + DEV_SEQ_HI]
        shl     rdx, 32
        or      rax, rdx                        /* rax = S */
        add     r15, rax
        mov     rbx, [dev_area + r14 * 8]
        add     rbx, 4096                       /* rbx = page 0 */
        mov     r12, [dma_pages]                /* r12 = NP */
        mov     r11, r12
        shl     r11, 12
        add     r11, rbx                        /* r11 = end of the pages */
        mov     rdi, rbx
        test    rax, rax
        jz      dma_zero                        /* S = 0: all untouched */
        /* page P holds s = S - ((S - 1 - P) mod NP) if S > P, else 0:
         * k = (S - 1) mod NP, base = S - k; P <= k: s = base + P;
         * P > k: s = base + P - NP if S > NP, else untouched. */
        mov     r9, rax                         /* r9 = S */
        dec     rax
        xor     edx, edx
        div     r12                             /* rdx = k */
        mov     r10, rdx
        inc     r10
        shl     r10, 12
        add     r10, rbx                        /* r10 = end of pages 0..=k */
        mov     r8, r9
        sub     r8, rdx                         /* r8 = base */
        mov     rdx, r8                         /* rdx = expected s */
        xchg    r10, r11
        call    dma_seq_range                   /* pages 0..=k */
        xchg    r10, r11
        cmp     r9, r12
        jbe     dma_zero                        /* S <= NP: rest untouched */
        sub     rdx, r12                        /* base + (k + 1) - NP */
        call    dma_seq_range                   /* pages k+1 .. NP-1 */
        jmp     dma_done
dma_zero:
        call    dma_zero_range
dma_done:
        /* SCRATCH */
        xor     ecx, ecx
        push    r12
        mov     r12, r14
2:      call    scratch_value
        mov     edx, [r13 + DEV_SCRATCH + rcx * 4]
        cmp     edx, eax
        jne     reg_mismatch
        inc     ecx
        cmp     ecx, DEV_SCRATCH_N
        jb      2b
        pop     r12
        /* restart; the next check waits for an interrupt after this */
        mov     rax, [dev_irqs + r14 * 8]
        mov     [dev_irq_seen + r14 * 8], rax
        mov     dword ptr [r13 + DEV_CTRL], DEV_CTRL_RUN_IRQ
        inc     r14
        cmp     r14, [ndevs]
        jb      dev_check_one

        lea     rsi, [str_dev]
        call    puts
        mov     rax, [dev_pass]
        call    print_dec
        lea     rsi, [str_dev_seq]
        call    puts
        mov     rax, r15
        call    print_dec
        call    newline
        pop     r15
        pop     r14
        pop     r13
        pop     r12
        pop     rbp
        pop     rbx
        ret

/* dma_seq_range: pages [rdi, r11) must hold [0] = rdx, [8] = the page's
 * address, [4088] = !rdx, rdx counting up by one per page.  On return
 * rdi = r11, rdx advanced.  Mismatch -> DMA MISMATCH line, halt.
 * Clobbers rax. */
dma_seq_range:
1:      cmp     rdi, r11
        jae     2f
        cmp     [rdi], rdx
        jne     3f
        cmp     [rdi + 8], rdi
        jne     4f
        mov     rax, rdx
        not     rax
        cmp     [rdi + 4088], rax
        jne     5f
        inc     rdx
        add     rdi, 4096
        jmp     1b
2:      ret
3:      mov     rax, rdx
        mov     rdx, [rdi]
        jmp     dma_mismatch
4:      mov     rax, rdi
        mov     rdx, [rdi + 8]
        jmp     dma_mismatch
5:      mov     rdx, [rdi + 4088]
        jmp     dma_mismatch

/* dma_zero_range: pages [rdi, r11) never written: words 0, 8, 4088 = 0.
 * Clobbers rax, rdx. */
dma_zero_range:
        xor     eax, eax
1:      cmp     rdi, r11
        jae     2f
        mov     rdx, [rdi]
        test    rdx, rdx
        jnz     dma_mismatch
        mov     rdx, [rdi + 8]
        test    rdx, rdx
        jnz     dma_mismatch
        mov     rdx, [rdi + 4088]
        test    rdx, rdx
        jnz     dma_mismatch
        add     rdi, 4096
        jmp     1b
2:      ret

/* rdi = page, rax = expected, rdx = found.  Prints, halts. */
dma_mismatch:
        mov     rbx, rdi
        mov     r10, rax
        mov     r11, rdx
        lea     rsi, [str_dma_mismatch]
        call    puts
        mov     rax, rbx
        shr     rax, 12
        call    print_dec
        jmp     print_exp_found

/* r14 = n, rcx = register, eax = expected, edx = found.  Prints, halts. */
reg_mismatch:
        mov     ebx, ecx
        mov     r10d, eax
        mov     r11d, edx
        lea     rsi, [str_reg_mismatch]
        call    puts
        mov     rax, r14
        call    print_dec
        lea     rsi, [str_reg]
        call    puts
        mov     eax, ebx
        call    print_dec
print_exp_found:                                /* r10 = expected, r11 = found */
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

/* r14 = n, r13 = BAR0, eax = STATUS with ERROR set.  Prints, halts. */
dev_error:
        mov     ebx, eax
        lea     rsi, [str_dev_error]
        call    puts
        mov     rax, r14
        call    print_dec
        lea     rsi, [str_status]
        call    puts
        mov     eax, ebx
        call    print_hex
        lea     rsi, [str_addr]
        call    puts
        mov     eax, [r13 + DEV_ERR_ADDR_LO]
        mov     edx, [r13 + DEV_ERR_ADDR_HI]
        shl     rdx, 32
        or      rax, rdx
        call    print_hex
        call    newline
        jmp     halt_forever

/* MSI-X vectors DEV_VEC + n: count, EOI.  One 16-byte stub per device. */
        .balign 16
dev_isr_stubs:
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7
        .balign 16
        push    rax
        mov     eax, \n
        jmp     dev_isr_common
        .endr
dev_isr_common:
        inc     qword ptr [dev_irqs + rax * 8]
        mov     rax, [lapic_base]
        mov     dword ptr [rax + APIC_EOI], 0
        pop     rax
        iretq
