from tensorrt_llm_dwdp.cli import main

raise SystemExit(main())
